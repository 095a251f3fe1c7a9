"""multiproc: jb.fit over 1, 2 and 4 local processes on JAX's distributed runtime.

Every process holds one CPU device and the whole training set; each minibatch of the
chapter-3 network (minibatch 1000 by default) is sharded over the processes and the
gradients are all-reduced over gloo on loopback. Workers get ``scripts/launch_local.py``'s
environment (one compute thread each when they outnumber the cores). Reported: the median
epoch after the first (compiling) one, as ``jb.fit`` measures it (training plus the
per-epoch evaluation of the training set), and examples/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from scripts.bench.context import Context
from scripts.bench.harness import median
from scripts.bench.setting import ETA, LMBDA, N_TRAIN, SIZES
from scripts.launch_local import free_port, worker_env

WORKER = textwrap.dedent(
    f"""
    import json, sys
    import jax
    address, num, pid, data_dir, batch, epochs, out = sys.argv[1:]
    if int(num) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=int(num),
                                   process_id=int(pid), initialization_timeout=120)
    import optax
    import jbackprop as jb
    from jbackprop import data
    X, y = data.load("mnist", data_dir=data_dir or None, progress=False).train
    X, y = X[:{N_TRAIN}], y[:{N_TRAIN}]
    model = jb.Model({SIZES!r}, l2={LMBDA!r})
    params = jb.init_params(jax.random.key(0), model)
    _, history = jb.fit(params, model, (X, y), optax.sgd({ETA!r}), int(epochs), int(batch),
                        jax.random.key(1))
    if int(pid) == 0:
        seconds = [r["seconds"] for r in history[1:]]
        json.dump({{"seconds": seconds, "devices": len(jax.devices())}}, open(out, "w"))
    """
)


def run_processes(processes: int, batch: int, epochs: int, data_dir: str) -> dict:
    """Train with ``processes`` local processes; the epoch times of process 0."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        address = f"127.0.0.1:{free_port()}"
        args = [address, str(processes), "", data_dir, str(batch), str(epochs), str(out)]
        procs = []
        for i in range(processes):
            args[2] = str(i)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, *args],
                    env=worker_env(processes),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        errors = [p.communicate(timeout=1800)[1] for p in procs]
        for p, err in zip(procs, errors, strict=True):
            if p.returncode:
                raise RuntimeError(f"a worker failed:\n{err[-3000:]}")
        result = json.loads(out.read_text())
    t = median(result["seconds"])
    return {
        "processes": processes,
        "devices": result["devices"],
        "minibatch": batch,
        "epoch_seconds": result["seconds"],
        "median_seconds": t,
        "examples_per_s": N_TRAIN / t,
    }


def data_dir(ctx: Context) -> str:
    """The folder holding MNIST's files, for the workers' ``data.load``."""
    folder = ctx.args.data_dir or os.environ.get("JBACKPROP_DATA", "")
    if folder and (Path(folder) / "mnist").is_dir():
        folder = str(Path(folder) / "mnist")
    return folder


def run(ctx: Context) -> None:
    args, report = ctx.args, ctx.report
    bs = args.multiproc_batch
    print(f"\n== multiproc: jb.fit over {args.processes} local processes, minibatch {bs} ==")
    base = None
    for processes in args.processes:
        try:
            r = run_processes(processes, bs, max(2, args.epochs) + 1, data_dir(ctx))
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            report.note(f"multiproc with {processes} processes failed: {err}")
            continue
        base = base or r["examples_per_s"]
        r |= {"section": "multiproc", "approach": f"jb.fit, {processes} processes"}
        r["speedup"] = r["examples_per_s"] / base
        report.add(r)
        print(
            f"  {processes} process(es): {r['examples_per_s']:10.0f} examples/s, "
            f"{1000 * r['median_seconds']:.0f} ms/epoch, {r['speedup']:.2f}x",
            flush=True,
        )
