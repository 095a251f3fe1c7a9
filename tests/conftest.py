"""Shared test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST files in ``../shared/data/mnist`` beside the checkout.

    Skipped where they are absent, except on CI (``CI=true``), where that is a failure.
    """
    import os
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    names = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        message = f"real MNIST not found in {folder} (missing: {', '.join(missing)})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must provide it", pytrace=False)
        pytest.skip(message)
    return folder
