#!/usr/bin/env python3
"""Training throughput with 1, 2 and 4 local processes on JAX's distributed runtime.

    .venv/bin/python scripts/bench_multiprocess.py --processes 1 2 4 --epochs 4

Every process holds one CPU device and the whole training set; each minibatch of the
784-100-10 network (sigmoid, cross-entropy + L2, plain SGD) is sharded over the processes
and the gradients are all-reduced over gloo on loopback. Workers get the launcher's
environment (one compute thread each when they outnumber the cores). Reported: the median epoch time
after the first (compiling) epoch, as ``jb.fit`` measures it (training plus the per-epoch
evaluation of the training set), and examples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_local import worker_env

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    address, num, pid, data_dir, batch, epochs, out = sys.argv[1:]
    if int(num) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=int(num),
                                   process_id=int(pid), initialization_timeout=120)
    import numpy as np, optax
    import jbackprop as jb
    from jbackprop import data
    X, y = data.load("mnist", data_dir=data_dir or None, progress=False).train
    model = jb.Model((784, 100, 10), l2=5.0)
    params = jb.init_params(jax.random.key(0), model)
    _, history = jb.fit(params, model, (X, y), optax.sgd(0.5), int(epochs), int(batch),
                        jax.random.key(1))
    if int(pid) == 0:
        seconds = [r["seconds"] for r in history[1:]]
        json.dump({"seconds": seconds, "devices": len(jax.devices())}, open(out, "w"))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, batch: int, epochs: int, data_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        address = f"127.0.0.1:{free_port()}"
        env = worker_env(processes)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    address,
                    str(processes),
                    str(i),
                    data_dir,
                    str(batch),
                    str(epochs),
                    str(out),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(processes)
        ]
        errors = [p.communicate(timeout=1800)[1] for p in procs]
        for p, err in zip(procs, errors, strict=True):
            if p.returncode:
                raise SystemExit(f"a worker failed:\n{err[-3000:]}")
        result = json.loads(out.read_text())
    median = sorted(result["seconds"])[len(result["seconds"]) // 2]
    return {
        "processes": processes,
        "devices": result["devices"],
        "minibatch": batch,
        "epoch_seconds": result["seconds"],
        "median_seconds": median,
        "examples_per_second": 50_000 / median,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--data-dir", default=os.environ.get("JBACKPROP_DATA", ""))
    parser.add_argument("--json", type=Path, default=Path("runs/bench-multiprocess.json"))
    args = parser.parse_args()
    rows = [run(p, args.batch_size, args.epochs, args.data_dir) for p in args.processes]
    base = rows[0]["examples_per_second"]
    print(f"{'processes':>9} {'devices':>7} {'examples/s':>11} {'ms/epoch':>9} {'speed-up':>8}")
    for r in rows:
        print(
            f"{r['processes']:>9} {r['devices']:>7} {r['examples_per_second']:>11,.0f} "
            f"{1000 * r['median_seconds']:>9.0f} {r['examples_per_second'] / base:>8.2f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=2))
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
