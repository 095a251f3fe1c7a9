#!/usr/bin/env python3
"""Start N local processes of the MNIST experiment that train as one, over loopback.

    python scripts/launch_local.py 2 -- --epochs 2 --train-size 5000 --out runs/two

Each process gets ``--coordinator 127.0.0.1:PORT --num-processes N --process-id I`` (a free
port is picked); process 0 prints and writes the outputs. If any process fails, the others
are stopped and the launcher exits with that process's status.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(n: int) -> dict[str, str]:
    """CPU workers; when they outnumber the cores, one compute thread each (XLA's default
    of one thread per core would oversubscribe the machine n times)."""
    env = os.environ | {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    if n >= (os.cpu_count() or 1) and "XLA_FLAGS" not in env:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
    return env


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, help="number of processes")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then experiment flags")
    args = parser.parse_args()
    if args.n < 1:
        parser.error(f"n must be at least 1, got {args.n}")
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    address = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "jbackprop.experiments.mnist", *flags),
                *("--coordinator", address, "--num-processes", str(args.n)),
                *("--process-id", str(i)),
            ],
            env=worker_env(args.n),
        )
        for i in range(args.n)
    ]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                print(
                    f"launch_local: process {i} exited with {code}; stopping the others",
                    file=sys.stderr,
                )
                stop(procs)
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop(procs)
        return 130


if __name__ == "__main__":
    sys.exit(main())
