"""Experiments that exercise the library on real data; run them with ``python -m``."""
