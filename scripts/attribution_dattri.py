"""dattri's own TRAK, TracIn, Grad-Dot and Grad-Cos on the weights jbackprop trained.

Reads a run folder of ``python -m jbackprop.experiments.attribution`` (its parameter files,
``ground_truth.npz`` and ``results.json``), loads every model into dattri's own
``MLPMnist`` (jbackprop's ``(n_out, n_in)`` weights are ``nn.Linear``'s layout), runs
dattri's attributors exactly as its ``experiments/benchmark_result.py`` sets them up
(512-dimensional random projections, TracIn over the ten full-data models with equal
weights, TRAK's margin and correct-class probability), scores them with the same LDS and
ground truth, and writes ``dattri.json`` and ``dattri.md`` beside jbackprop's results.

dattri and PyTorch are not dependencies of jbackprop; this runs in a separate
environment::

    python3 -m venv .venv-dattri
    .venv-dattri/bin/pip install torch==2.13.0 dattri
    .venv-dattri/bin/pip install -e .
    .venv-dattri/bin/python scripts/attribution_dattri.py --run experiments/runs/attribution
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor
from dattri.benchmark.models.mlp import create_mlp_model
from dattri.task import AttributionTask
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jbackprop as jb
from jbackprop.experiments.attribution.protocol import Setup, load, mean_lds

ENSEMBLES = (1, 5, 10)


def state_dict(params) -> dict[str, torch.Tensor]:
    """jbackprop parameters as ``MLPMnist``'s state dict: ``w`` is ``fc{l}.weight``."""
    return {
        f"fc{l}.{torch_name}": torch.from_numpy(np.array(layer[name], np.float32))
        for l, layer in enumerate(params, start=1)
        for name, torch_name in (("w", "weight"), ("b", "bias"))
    }


def loader(X, Y, batch_size: int) -> DataLoader:
    data = TensorDataset(torch.from_numpy(np.asarray(X)), torch.from_numpy(np.asarray(Y)).long())
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("experiments/runs/attribution"))
    p.add_argument("--data-dir", help="MNIST folder (default: $JBACKPROP_DATA)")
    p.add_argument("--proj-dim", type=int, default=512, help="dattri's projection dimension")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--table-only",
        action="store_true",
        help="only rewrite dattri.md from dattri.json and the run's current results.json",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = json.loads((args.run / "results.json").read_text())
    if args.table_only:
        saved = json.loads((args.run / "dattri.json").read_text())
        write_table(args.run, results, saved["lds"], saved["proj_dim"], saved["dattri"])
        return 0
    saved = results["setup"]
    setup = Setup(**(saved | {"sizes": tuple(saved["sizes"])}))
    if setup.sizes != (784, 128, 64, 10):
        p.error(f"dattri's MLPMnist is 784-128-64-10; the run in {args.run} has {setup.sizes}")
    data = load(setup, args.data_dir)
    truth = np.load(args.run / "ground_truth.npz")
    subsets, targets = truth["subsets"], truth["targets"][:, : setup.n_test]

    def weights(kind: str, k: int):
        params, _ = jb.load_params(args.run / "models" / f"{kind}_{k}.safetensors", setup.model)
        return state_dict(params)

    full = [weights("full", k) for k in range(setup.models)]
    half = [weights("half", k) for k in range(setup.models)]
    model = create_mlp_model("mnist").eval()
    X_test, Y_test = data.X_test[: setup.n_test], data.Y_test[: setup.n_test]
    train_loader = loader(data.X, data.Y, 500)
    test_loader = loader(X_test, Y_test, 500)

    def f_loss(params, batch):  # one example's cross-entropy, as dattri's benchmark writes it
        image, label = batch
        out = torch.func.functional_call(model, params, image.unsqueeze(0))
        return nn.CrossEntropyLoss()(out, label.unsqueeze(0))

    def f_margin(params, batch):  # TRAK's ln(p / (1 - p))
        logp = -f_loss(params, batch)
        return logp - torch.log(1 - torch.exp(logp))

    def f_probability(params, batch):
        return torch.exp(-f_loss(params, batch))

    projector = {"proj_dim": args.proj_dim, "device": "cpu"}
    rows = []

    def record(name: str, models: int, run):
        start = time.perf_counter()
        with torch.no_grad():
            scores = run()
        seconds = time.perf_counter() - start
        lds = mean_lds(scores.T.numpy(), subsets, targets)  # dattri: (n_train, n_test)
        rows.append({"method": name, "models": models, "lds": lds, "seconds": seconds})
        print(f"dattri {name}: LDS {lds:.4f} ({seconds:.1f} s)", flush=True)

    def tracin(checkpoints, normalized: bool):
        task = AttributionTask(model=model, loss_func=f_loss, checkpoints=checkpoints)
        weight = torch.ones(len(checkpoints) if isinstance(checkpoints, list) else 1) * 1e-3
        attributor = TracInAttributor(
            task=task,
            weight_list=weight,
            normalized_grad=normalized,
            projector_kwargs=dict(projector),
        )
        return attributor.attribute(train_loader, test_loader)

    def trak(checkpoints):
        task = AttributionTask(model=model, loss_func=f_margin, checkpoints=checkpoints)
        attributor = TRAKAttributor(
            task=task,
            correct_probability_func=f_probability,
            projector_kwargs=dict(projector),
        )
        attributor.cache(train_loader)
        return attributor.attribute(test_loader)

    record("Grad-Dot", 1, lambda: tracin(full[0], False))
    record("Grad-Cos", 1, lambda: tracin(full[0], True))
    record("TracIn", setup.models, lambda: tracin(full, False))
    for m in ENSEMBLES:
        if m <= setup.models:
            record(f"TRAK-{m}", m, lambda m=m: trak(half[:m]))

    versions = {"dattri": version("dattri"), "torch": torch.__version__}
    report = {"proj_dim": args.proj_dim, "threads": args.threads, "lds": rows} | versions
    (args.run / "dattri.json").write_text(json.dumps(report, indent=2))
    write_table(args.run, results, rows, args.proj_dim, version("dattri"))
    return 0


def write_table(run: Path, results: dict, rows: list[dict], proj_dim: int, dattri: str):
    """``dattri.md``: jbackprop's and dattri's LDS and seconds, method by method."""
    ours = {r["method"]: r for r in results["lds"]}
    lines = [
        f"dattri {dattri} (projection {proj_dim}) against jbackprop (exact), same weights "
        "and ground truth",
        "",
        "| method | models | jbackprop LDS | jbackprop s | dattri LDS | dattri s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o = ours.get(r["method"], {})
        lines.append(
            f"| {r['method']} | {r['models']} | {o.get('lds', float('nan')):.4f} | "
            f"{o.get('seconds', float('nan')):.1f} | {r['lds']:.4f} | {r['seconds']:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    (run / "dattri.md").write_text(table)


if __name__ == "__main__":
    raise SystemExit(main())
