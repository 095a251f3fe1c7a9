"""Multi-process training over JAX's distributed runtime, two processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

# End-to-end runs in subprocesses: the full suite runs them, the quick tier does not.
pytestmark = pytest.mark.slow

# Each process trains 2 epochs of a small network on a slice of real MNIST and saves its
# final parameters; with no coordinator it is the single-process reference.
WORKER = textwrap.dedent(
    """
    import sys
    import jax
    coordinator, num, pid, data_dir, out = sys.argv[1:]
    if coordinator != "none":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num),
                                   process_id=int(pid), initialization_timeout=60)
    import numpy as np, optax
    import jbackprop as jb
    from jbackprop import data
    ds = data.load("mnist", data_dir=data_dir, progress=False)
    X, y = ds.train[0][:600], ds.train[1][:600]
    model = jb.Model((784, 16, 10), l2=1.0)
    params = jb.init_params(jax.random.key(0), model)
    params, history = jb.fit(params, model, (X, y), optax.sgd(0.5), epochs=2, batch_size=20,
                             key=jax.random.key(1), validation=ds.validation)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(params)]
    np.savez(out, *leaves, val=history[-1]["val_accuracy"], devices=len(jax.devices()))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _run_workers(tmp_path: Path, mnist_dir: Path, coordinator: str, n: int):
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                coordinator,
                str(n),
                str(i),
                str(mnist_dir),
                str(tmp_path / f"p{i}.npz"),
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return [np.load(tmp_path / f"p{i}.npz") for i in range(n)]


def test_two_processes_train_like_one(tmp_path, mnist_dir):
    port = _free_port()
    two = _run_workers(tmp_path, mnist_dir, f"127.0.0.1:{port}", 2)
    ref_dir = tmp_path / "single"
    ref_dir.mkdir()
    (one,) = _run_workers(ref_dir, mnist_dir, "none", 1)
    assert int(two[0]["devices"]) == 2 and int(one["devices"]) == 1
    names = [k for k in one.files if k.startswith("arr_")]
    for name in names:
        # Both processes end with exactly the same parameters ...
        np.testing.assert_array_equal(two[0][name], two[1][name])
        # ... which equal a single-process run up to float32 summation order.
        np.testing.assert_allclose(two[0][name], one[name], rtol=1e-4, atol=1e-5)
    assert abs(float(two[0]["val"]) - float(one["val"])) < 2e-3


def test_peer_death_stops_the_survivor_with_a_message(tmp_path, mnist_dir):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    flags = [
        "--data-dir",
        str(mnist_dir),
        "--epochs",
        "200",
        "--train-size",
        "3000",
        "--sizes",
        "784",
        "30",
        "10",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--coordinator",
        address,
        "--num-processes",
        "2",
        "--timeout",
        "60",
    ]
    cmd = [sys.executable, "-m", "jbackprop.experiments.mnist", *flags]
    first = subprocess.Popen(
        [*cmd, "--process-id", "0"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = subprocess.Popen(
        [*cmd, "--process-id", "1"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        line = ""
        while not line.startswith("epoch"):  # the first epoch's line: both are training
            line = first.stdout.readline()
            assert line, "process 0 ended before training"
        second.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = first.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
    assert first.returncode not in (0, None)
    assert "process 0" in err and address in err, err[-2000:]
    assert "Traceback" not in err
