"""Value types for the experiments' command lines: each turns one flag's text into a
checked value, or raises the ``argparse.ArgumentTypeError`` that argparse turns into a
one-line error naming the flag."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["integer", "number", "positive_int"]


def positive_int(text: str) -> int:
    """An integer ``>= 1``."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def integer(text: str) -> int:
    """Any integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def number(low: float, high: float | None = None, *, low_open: bool = False) -> Callable:
    """A type for finite numbers in ``[low, high)`` (``(low, high)`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if too_low or not math.isfinite(value) or (high is not None and value >= high):
            bound = f"> {low}" if low_open else f">= {low}"
            upper = f" and < {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"expected a number {bound}{upper}, got {text}")
        return value

    return parse
