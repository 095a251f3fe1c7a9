"""The one timing harness of every section: warm-up, alternation, medians, checks, JSON.

The machine is shared, so other processes come and go during a run, and approaches timed
at different moments would compare the load, not the code. Every comparison therefore
alternates: one warm-up (compiling) epoch of every approach, then one timed epoch of each
in turn (a, b, c, a, b, c, ...), and tables show medians. Process CPU seconds are kept
beside wall seconds: other processes disturb them much less. Targets are ratios measured
in the same run, printed as PASS/FAIL lines and kept with every row in the JSON report.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import optax

import jbackprop as jb

# (params, optimizer state, epoch index, epoch key) -> (params, optimizer state)
EpochFn = Callable[[Any, Any, int, jax.Array], tuple[Any, Any]]
# (epoch index, epoch key) -> (wall seconds, CPU seconds) of that epoch
Runner = Callable[[int, jax.Array], tuple[float, float]]

OPS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t}


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def clock(fn: Callable, *args) -> tuple[Any, float]:
    """``fn(*args)`` and its wall seconds, waiting for every array it returns."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def clock_cpu(fn: Callable, *args) -> tuple[Any, float, float]:
    """``fn(*args)``, its wall seconds and the process CPU seconds (all threads) it took."""
    c0 = time.process_time()
    out, wall = clock(fn, *args)
    return out, wall, time.process_time() - c0


class EpochRunner:
    """One approach's training state, advanced by one timed epoch per call."""

    def __init__(self, epoch: EpochFn, params: Any, state: Any):
        self.epoch, self.params, self.state = epoch, params, state

    def __call__(self, e: int, key: jax.Array) -> tuple[float, float]:
        (self.params, self.state), wall, cpu = clock_cpu(
            self.epoch, self.params, self.state, e, key
        )
        return wall, cpu


def sgd_runner(epoch: EpochFn, params: Any, optimizer: optax.GradientTransformation):
    return EpochRunner(epoch, params, optimizer.init(params))


@dataclass
class Samples:
    """Timed epochs of one approach, in the order they ran."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def alternate(
    runners: dict[str, Runner],
    epochs: int,
    key: jax.Array,
    between: Callable[[], object] | None = None,
) -> dict[str, Samples]:
    """Epoch 1 of every runner (the warm-up, not kept), then epochs 2..epochs+1 of every
    runner in turn. Epoch ``e`` of every runner gets the key ``fold_in(key, e)``, the key
    ``jb.fit`` gives its epoch ``e``. ``between`` runs after every round."""
    out = {name: Samples() for name in runners}
    for e in range(1, epochs + 2):
        k = jax.random.fold_in(key, e)
        for name, run in runners.items():
            wall, cpu = run(e, k)
            if e > 1:
                out[name].wall.append(wall)
                out[name].cpu.append(cpu)
        if between is not None:
            between()
    return out


def interleaved_calls(
    fns: dict[str, Callable], batches: list[tuple], params: Any, rounds: int
) -> dict[str, list[float]]:
    """Seconds per call of every ``fn(params, *batch)``: one warm-up call each, then
    ``rounds`` rounds in which every function runs in turn, each on the next batch. Fast
    functions run more calls per round (up to 50) so that each gets similar time."""
    per_call = {}
    for name, f in fns.items():
        clock(f, params, *batches[0])
        per_call[name] = median(clock(f, params, *b)[1] for b in batches[1:4])
    slowest = max(per_call.values())
    reps = {name: int(min(50, max(1, slowest / t))) for name, t in per_call.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    i = 0
    for _ in range(rounds):
        for name, f in fns.items():
            for _ in range(reps[name]):
                samples[name].append(clock(f, params, *batches[i % len(batches)])[1])
                i += 1
    return samples


@dataclass
class Report:
    """Every row, check and note of a run, written to JSON at the end."""

    rows: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def note(self, msg: str) -> None:
        print(f"  note: {msg}", flush=True)
        self.notes.append(msg)

    def check(self, name: str, value: float, op: str, target: float, detail: str = "") -> bool:
        """A target as a PASS/FAIL line: ``value op target``."""
        ok = bool(OPS[op](value, target))
        rec = {"check": name, "value": value, "op": op, "target": target, "pass": ok}
        if detail:
            rec["detail"] = detail
        self.checks.append(rec)
        tail = f"  ({detail})" if detail else ""
        print(
            f"{'PASS' if ok else 'FAIL'}: {name}: {value:.3g} {op} {target:.3g}{tail}", flush=True
        )
        return ok

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        return row

    def row(self, section: str, approach: str, minibatch: int | None = None) -> dict | None:
        for r in self.rows:
            same = r["section"] == section and r["approach"] == approach
            if same and minibatch in (None, r.get("minibatch")):
                return r
        return None

    def epoch_rows(
        self,
        section: str,
        minibatch: int,
        samples: dict[str, Samples],
        examples: int,
        flop: int,
        reference: str,
        extras: dict[str, dict] | None = None,
    ) -> None:
        """One row per approach: median epoch, examples/s, GFLOP/s, and the ratios of its
        examples/s and CPU seconds to the ``reference`` approach's."""
        extras = extras or {}
        ref = samples.get(reference)
        ref_wall = median(ref.wall) if ref else None
        ref_cpu = median(ref.cpu) if ref else None
        for name, s in samples.items():
            t, c = median(s.wall), median(s.cpu)
            row = {
                "section": section,
                "approach": name,
                "minibatch": minibatch,
                "examples_per_s": examples / t,
                "ms_per_epoch": 1e3 * t,
                "cpu_ms_per_epoch": 1e3 * c,
                "gflop_per_s": examples * flop / t / 1e9,
                "epoch_seconds": s.wall,
                "cpu_seconds": s.cpu,
            }
            if ref_wall:
                row["ratio_to_autodiff"] = ref_wall / t
                row["cpu_ratio_to_autodiff"] = ref_cpu / c if c else float("nan")
            row.update(extras.get(name, {}))
            self.add(row)

    def print_rows(self, section: str, minibatch: int | None = None) -> None:
        for r in self.rows:
            if r["section"] != section or minibatch not in (None, r["minibatch"]):
                continue
            ratio = r.get("ratio_to_autodiff", float("nan"))
            cpu = r.get("cpu_ratio_to_autodiff", float("nan"))
            print(
                f"  {r['approach']:<46} m={r['minibatch']:<5} "
                f"{r['examples_per_s'] / 1e3:7.1f}k ex/s {r['ms_per_epoch']:8.1f} ms/epoch "
                f"x{ratio:5.2f} (cpu x{cpu:5.2f}) {r['gflop_per_s']:6.1f} GFLOP/s",
                flush=True,
            )

    def write(self, path: str | Path, meta: dict) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "meta": meta | {"loadavg_end": loadavg()},
            "info": self.info,
            "rows": self.rows,
            "checks": self.checks,
            "notes": self.notes,
        }
        path.write_text(json.dumps(out, indent=2, default=str))
        return path


# --- the machine ------------------------------------------------------------------------


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def machine() -> dict:
    """What the numbers were measured on, and the load when the run started."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "jbackprop": getattr(jb, "__version__", "?"),
        "torch": torch_version(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "command": " ".join(["python", *sys.argv]),
        "loadavg": loadavg(),
    }
