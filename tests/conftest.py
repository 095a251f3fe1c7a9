"""Shared test fixtures and settings.

Hypothesis: the ``"jbackprop-core"`` profile is registered here but not loaded, so it
changes nothing for tests that do not ask for it. Property tests use it as the parent of
their own settings: derandomised and database-free (every run draws the same examples),
no deadline (the first call of a new model configuration compiles), and no shrinking (a
failing example is printed as drawn; shrinking would recompile for every candidate).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "jbackprop-core",
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large),
    print_blob=False,
)

# Worst |jb.grad - jax.grad(jb.cost)| seen by the property tests, per dtype; printed in the
# terminal summary so a run reports how close hand-written backprop is to autodiff.
_WORST_GRAD_DIFF: dict[str, float] = {}


@pytest.fixture(scope="session")
def worst_grad_diff() -> dict[str, float]:
    """A dict the property tests update with the largest absolute difference per dtype."""
    return _WORST_GRAD_DIFF


def pytest_terminal_summary(terminalreporter) -> None:
    if _WORST_GRAD_DIFF:
        terminalreporter.write_sep("-", "jb.grad vs jax.grad(jb.cost): worst absolute difference")
        for dtype, diff in sorted(_WORST_GRAD_DIFF.items()):
            terminalreporter.write_line(f"{dtype}: {diff:.3e}")


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield


def tree_max_abs_diff(a, b) -> float:
    """The largest absolute elementwise difference between two pytrees of arrays."""
    # In numpy: an eager jnp op would compile once per leaf shape.
    diffs = jax.tree.map(lambda u, v: np.max(np.abs(np.asarray(u) - np.asarray(v))), a, b)
    return float(max(jax.tree.leaves(diffs)))


@pytest.fixture(scope="session")
def max_abs_diff():
    """:func:`tree_max_abs_diff`, as a fixture so test modules need not import conftest."""
    return tree_max_abs_diff


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
