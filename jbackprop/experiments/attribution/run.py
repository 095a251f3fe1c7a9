"""One benchmark run: train, retrain for the ground truth, attribute, score, write.

The run folder receives ``results.json`` and ``results.md`` (the LDS table, timings, the
damping sweep, the speed of :func:`jbackprop.grad_gram` against stored autodiff gradients),
``attribution.png`` (the most helpful and most harmful training images of a few test
images), and what ``scripts/attribution_dattri.py`` needs to score dattri's own methods on
the same weights: ``models/full_{k}.safetensors``, ``models/half_{k}.safetensors`` and
``ground_truth.npz``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import jax
import numpy as np

import jbackprop as jb
from jbackprop.experiments.attribution import protocol, report
from jbackprop.experiments.attribution.protocol import Setup, mean_lds, timed
from jbackprop.io import atomic_write

DAMPINGS = (0.03, 0.1, 0.3, 1.0, 3.0)
ENSEMBLES = (1, 5, 10)


def run(setup: Setup, out: Path, data_dir: str | None, dampings=DAMPINGS, log=print) -> dict:
    """Run the whole benchmark into ``out``; return the results dict it also writes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    model = setup.model
    started = time.perf_counter()
    data = protocol.load(setup, data_dir)
    bench = slice(0, setup.n_test)
    tune = slice(setup.n_test, setup.n_test + setup.n_tune)
    X, Y = data.X, data.Y
    X_bench, Y_bench = data.X_test[bench], data.Y_test[bench]
    timings: dict[str, float] = {}

    log(f"training {setup.models} models on all {setup.n_train} images ...")
    start = time.perf_counter()
    keys = jax.random.split(jax.random.key(setup.seed), setup.models)
    full = protocol.train(setup, keys, X, Y)
    timings["train full models"] = time.perf_counter() - start

    log(f"training {setup.models} models on random halves (TRAK's ensemble) ...")
    start = time.perf_counter()
    halves = []
    for k in range(setup.models):
        idx = protocol.half_subset(setup, k)
        key = jax.random.fold_in(jax.random.key(setup.seed + 1), k)
        halves.append(protocol.unstack(protocol.train(setup, key[None], X[idx], Y[idx]), 0))
    timings["train half models"] = time.perf_counter() - start
    fulls = [protocol.unstack(full, k) for k in range(setup.models)]
    for k in range(setup.models):
        jb.save_params(out / "models" / f"full_{k}.safetensors", fulls[k], model)
        jb.save_params(out / "models" / f"half_{k}.safetensors", halves[k], model)
    accuracy = {
        "full": [jb.accuracy(p, X_bench, Y_bench, model) for p in fulls],
        "half": [jb.accuracy(p, X_bench, Y_bench, model) for p in halves],
    }
    mean = {k: float(np.mean(v)) for k, v in accuracy.items()}
    log(f"  test accuracy: full {mean['full']:.4f}, half {mean['half']:.4f}")

    truth, reused = cached_ground_truth(setup, out / "ground_truth.npz", data, log)
    timings["ground truth retraining" + (" (an earlier run's)" if reused else "")] = truth.seconds
    gt_bench = (truth.subsets, truth.targets[:, bench])
    gt_tune = (truth.subsets, truth.targets[:, tune])

    log("attributing ...")
    rows, scores = [], {}

    def method(name: str, models: int, fn, *args, **kwargs):
        # Timed twice: the first call includes compiling, the second is the warm cost.
        s, first, again = timed(fn, *args, repeat=1, **kwargs)
        scores[name] = s = np.asarray(s)
        per_test = protocol.lds(s, *gt_bench)
        rows.append(
            {
                "method": name,
                "models": models,
                "lds": float(np.nanmean(per_test)),
                "lds_se": float(np.nanstd(per_test) / np.sqrt(np.sum(~np.isnan(per_test)))),
                "seconds": first,
                "seconds_again": again,
            }
        )
        log(f"  {name}: LDS {rows[-1]['lds']:.4f} ({first:.1f} s, again {again:.1f} s)")

    method("Grad-Dot", 1, jb.grad_gram, fulls[0], X_bench, Y_bench, model, X, Y)
    method("Grad-Cos", 1, jb.grad_gram, fulls[0], X_bench, Y_bench, model, X, Y, normalize=True)
    method(
        "TracIn",
        setup.models,
        jb.attribution.tracin,
        full,
        X,
        Y,
        X_bench,
        Y_bench,
        model,
        setup.eta,
    )

    sweep, chosen = [], {}
    X_tune, Y_tune = data.X_test[tune], data.Y_test[tune]
    for m in [m for m in ENSEMBLES if m <= setup.models]:
        # TRAK's one hyperparameter, chosen for each ensemble size on the tuning images.
        for damping in dampings:
            s = jb.attribution.trak(halves[:m], X, Y, X_tune, Y_tune, model, damping)
            sweep.append({"models": m, "damping": damping, "tune_lds": mean_lds(s, *gt_tune)})
            log(f"  TRAK-{m}, damping {damping:g}: tuning LDS {sweep[-1]['tune_lds']:.4f}")
        chosen[m] = max((r for r in sweep if r["models"] == m), key=lambda r: r["tune_lds"])
        damping = chosen[m]["damping"]
        method(
            f"TRAK-{m}", m, jb.attribution.trak, halves[:m], X, Y, X_bench, Y_bench, model, damping
        )

    log("grad_gram against stored vmap(jax.grad) gradients ...")
    speed = speed_comparison(fulls[0], X_bench, Y_bench, X, Y, model)
    timings["total (this run)"] = time.perf_counter() - started

    results = {
        "setup": asdict(setup) | {"sizes": list(setup.sizes)},
        "test_accuracy": accuracy,
        "lds": rows,
        "trak_damping": {str(m): r["damping"] for m, r in chosen.items()},
        "damping_sweep": sweep,
        "timings_s": timings,
        "grad_gram_speed": speed,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }
    np.savez(out / "scores.npz", **scores)
    atomic_write(out / "results.json", json.dumps(results, indent=2).encode())
    atomic_write(out / "results.md", report.markdown(results).encode())
    trak_name = f"TRAK-{max(chosen)}"
    report.plot_examples(
        out / "attribution.png", scores[trak_name], X, Y, X_bench, Y_bench, trak_name
    )
    log(report.markdown(results))
    return results


def cached_ground_truth(setup: Setup, path: Path, data, log) -> tuple[protocol.GroundTruth, bool]:
    """The ground truth of an earlier run into the same folder with the same setup, or a
    new one (the retraining is the slow part; everything after it is cheap to redo), and
    whether it was reused."""
    stamp = json.dumps(asdict(setup), sort_keys=True)
    if path.exists():
        with np.load(path) as saved:
            if "setup" in saved and str(saved["setup"]) == stamp:
                log(f"ground truth: reusing {path}")
                truth = protocol.GroundTruth(
                    saved["subsets"], saved["targets"], float(saved["seconds"])
                )
                return truth, True
    runs = setup.subsets * setup.runs_per_subset
    log(f"ground truth: retraining {runs} models on {setup.subsets} half-size subsets ...")
    truth = protocol.ground_truth(setup, data, log)
    np.savez(
        path,
        subsets=truth.subsets,
        targets=truth.targets,
        n_test=setup.n_test,
        n_tune=setup.n_tune,
        seconds=truth.seconds,
        setup=stamp,
    )
    return truth, False


def speed_comparison(params, X1, Y1, X2, Y2, model, limit: int = 2000) -> dict:
    """Seconds of :func:`jbackprop.grad_gram` and of ``G1 G2ᵀ`` from stored ``vmap(jax.grad)``
    gradients on the same ``(m1, m2)`` block; compile excluded (best of 3 later calls)."""
    X2, Y2 = X2[:limit], Y2[:limit]
    ours, ours_first, ours_best = timed(jb.grad_gram, params, X1, Y1, model, X2, Y2)
    ref, ref_first, ref_best = timed(protocol.stored_gram, params, X1, Y1, X2, Y2)
    n_params = sum(int(np.size(v)) for layer in params for v in layer.values())
    return {
        "m1": int(X1.shape[0]),
        "m2": int(X2.shape[0]),
        "parameters": n_params,
        "grad_gram_s": ours_best,
        "stored_vmap_grad_s": ref_best,
        "speedup": ref_best / ours_best,
        "first_call_s": {"grad_gram": ours_first, "stored_vmap_grad": ref_first},
        "stored_gradients_bytes": (X1.shape[0] + X2.shape[0]) * n_params * 4,
        "max_abs_diff": float(np.max(np.abs(np.asarray(ours) - np.asarray(ref)))),
        "max_abs": float(np.max(np.abs(np.asarray(ref)))),
    }
