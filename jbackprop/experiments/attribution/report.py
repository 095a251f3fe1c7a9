"""The run's table (markdown) and its figure of helpful and harmful training images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from jbackprop.experiments.plots import png_bytes
from jbackprop.io import atomic_write

SHOWN = 4  # test images in the figure
TOP = 5  # training images per side


def markdown(results: dict) -> str:
    """The LDS table, the damping sweep, the timings and the speed comparison."""
    s = results["setup"]
    lines = [
        f"dattri MNIST-10 + MLP ({'-'.join(map(str, s['sizes']))}): {s['n_train']} training and "
        f"{s['n_test']} test images, {s['subsets']} subsets x {s['runs_per_subset']} "
        f"retraining(s), {s['epochs']} epochs",
        "",
        "| method | models | LDS ± s.e. | seconds (first call) | seconds (again) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['method']} | {r['models']} | {r['lds']:.4f} ± {r['lds_se']:.4f} | "
        f"{r['seconds']:.1f} | {r['seconds_again']:.1f} |"
        for r in results["lds"]
    ]
    chosen = ", ".join(f"{m} model(s): {d:g}" for m, d in results["trak_damping"].items())
    lines += ["", f"TRAK's damping, chosen on the tuning images: {chosen}", ""]
    lines += ["| damping | models | LDS (tuning images) |", "|---:|---:|---:|"]
    lines += [
        f"| {r['damping']:g} | {r['models']} | {r['tune_lds']:.4f} |"
        for r in results["damping_sweep"]
    ]
    lines += ["", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["timings_s"].items()]
    sp = results["grad_gram_speed"]
    lines += [
        "",
        f"grad_gram on a {sp['m1']} x {sp['m2']} block ({sp['parameters']} parameters): "
        f"{sp['grad_gram_s']:.3f} s against {sp['stored_vmap_grad_s']:.3f} s from stored "
        f"vmap(jax.grad) gradients ({sp['speedup']:.1f}x; those gradients take "
        f"{sp['stored_gradients_bytes'] / 2**30:.2f} GiB); max |difference| "
        f"{sp['max_abs_diff']:.2e} of max |K| {sp['max_abs']:.2e}",
        "",
    ]
    return "\n".join(lines)


def examples_figure(scores, X, Y, X_test, Y_test, name: str) -> Figure:
    """For the first test images: the ``TOP`` training images with the highest scores
    (most helpful) and the lowest (most harmful)."""
    shown = min(SHOWN, scores.shape[0])
    fig = Figure(figsize=(1.2 * (2 * TOP + 1), 1.45 * shown), layout="constrained")
    axes = fig.subplots(shown, 2 * TOP + 1, squeeze=False)
    for i in range(shown):
        order = np.argsort(scores[i])
        picks = [(X_test[i], f"test: {Y_test[i]}", "black")]
        picks += [(X[j], f"{Y[j]}  {scores[i, j]:+.2g}", "tab:green") for j in order[::-1][:TOP]]
        picks += [(X[j], f"{Y[j]}  {scores[i, j]:+.2g}", "tab:red") for j in order[:TOP]]
        for ax, (image, label, color) in zip(axes[i], picks, strict=True):
            ax.imshow(np.asarray(image).reshape(28, 28), cmap="gray_r")
            ax.set_title(label, fontsize=8, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"{name}: test image, its {TOP} most helpful (green) and {TOP} most harmful (red) "
        "training images, label and score"
    )
    return fig


def plot_examples(path: Path, scores, X, Y, X_test, Y_test, name: str) -> Path:
    """Write :func:`examples_figure` to ``path`` as a PNG."""
    atomic_write(path, png_bytes(examples_figure(scores, X, Y, X_test, Y_test, name)))
    return path
