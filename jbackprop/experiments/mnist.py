"""Train and evaluate on MNIST or Fashion-MNIST: ``python -m jbackprop.experiments.mnist``.

The defaults are the book's chapter-3 network: 784-100-10, sigmoid, cross-entropy, L2 with
λ = 5.0, η = 0.5, minibatch 10, 30 epochs. Training uses the first 50,000 training images,
validation the last 10,000; the test set is read only once, after training, as the lecture
insists (hyperparameters are chosen on the validation set).

After every epoch the run folder receives an atomic checkpoint, so ``--resume DIR``
continues an interrupted run and ends with exactly the parameters an uninterrupted run
would have. At the end it holds ``metrics.json``, ``learning_curves.png`` and
``params.safetensors`` (read back with :func:`jbackprop.load_params`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbackprop as jb
from jbackprop import activations, costs, data
from jbackprop.experiments import distributed
from jbackprop.experiments.plots import plot_grad_stats, plot_learning_curves
from jbackprop.io import atomic_write, load_checkpoint, save_checkpoint

CHECKPOINT = "checkpoint.safetensors"
# Flags that may differ between a run and its resumption without changing its result.
NOT_CONFIG = {"out", "resume", "debug", "epochs", "progress", "data_dir", "patience"} | {
    "coordinator",
    "num_processes",
    "process_id",
    "timeout",
}


class UserError(Exception):
    """A problem the user can fix; reported as one paragraph, without a traceback."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; raised after the current checkpoint is written."""


# --- command line ---------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _number(low: float, high: float | None = None, *, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if too_low or not np.isfinite(value) or (high is not None and value >= high):
            bound = f"> {low}" if low_open else f">= {low}"
            upper = f" and < {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"expected a number {bound}{upper}, got {text}")
        return value

    return parse


def _activation(text: str) -> str:
    try:
        return activations.get(text).spec
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _sweep(text: str) -> tuple[str, tuple[float, ...]]:
    name, _, values = text.partition("=")
    if name not in SWEEPABLE or not values:
        raise argparse.ArgumentTypeError(
            f"expected NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)}, got {text!r}"
        )
    try:
        parsed = tuple(SWEEPABLE[name](v) for v in values.split(","))
    except (argparse.ArgumentTypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"--sweep {name}: {err}") from None
    return name, parsed


SWEEPABLE = {
    "eta": _number(0, low_open=True),
    "lmbda": _number(0),
    "dropout": _number(0, 1),
    "seed": int,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line naming the problem, instead of the whole usage text."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m jbackprop.experiments.mnist",
        description="Train a fully-connected network by hand-written backprop on MNIST.",
    )
    a = p.add_argument
    a("--dataset", choices=data.DATASETS, default="mnist")
    a("--data-dir", type=Path, help="folder holding the four IDX .gz files")
    a("--sizes", type=_positive_int, nargs="+", default=[784, 100, 10])
    a("--hidden", type=_activation, default="sigmoid", help=f"one of {activations.names()}")
    a("--output", type=_activation, default="sigmoid")
    a("--cost", choices=costs.names(), default="cross_entropy")
    a("--init", choices=("normal", "scaled"), default="scaled")
    a("--eta", type=_number(0, low_open=True), default=0.5, help="learning rate")
    a("--lmbda", type=_number(0), default=5.0, help="L2 regularisation λ")
    a("--l1", type=_number(0), default=0.0, help="L1 regularisation λ")
    a("--dropout", type=_number(0, 1), default=0.0, help="probability of dropping a unit")
    a("--batch-size", type=_positive_int, default=10)
    a("--epochs", type=_positive_int, default=30)
    a("--optimizer", choices=("sgd", "momentum", "adam"), default="sgd")
    a("--seed", type=int, default=0)
    a("--train-size", type=_positive_int, help="use only the first N training images")
    a("--patience", type=_positive_int, help="early stopping on validation accuracy")
    a("--out", type=Path, help="run folder (default: a new folder under runs/)")
    a("--resume", type=Path, metavar="DIR", help="continue the run saved in DIR")
    a("--dp-clip", type=_number(0, low_open=True), help="DP-SGD: per-example clip norm")
    a("--dp-noise", type=_number(0), default=0.0, help="DP-SGD: noise multiplier σ")
    a("--sweep", type=_sweep, action="append", help="e.g. eta=0.1,0.5,1.0 (repeatable)")
    a("--track-stats", action="store_true", help="record gradient noise statistics")
    a("--coordinator", metavar="HOST:PORT", help="multi-process: process 0's address")
    a("--num-processes", type=_positive_int, help="multi-process: how many processes")
    a("--process-id", type=int, help="multi-process: this process's index, 0..N-1")
    a("--timeout", type=_positive_int, default=120, help="seconds to wait for peers")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a("--debug", action="store_true", help="show tracebacks")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    try:
        _model(vars(args))
    except ValueError as err:
        p.error(str(err).removeprefix("Model: "))
    if args.sizes[0] != 784:
        p.error(f"--sizes must start with 784 (28x28 pixels), got {args.sizes[0]}")
    if args.sizes[-1] != 10:
        p.error(f"--sizes must end with 10 (one output per class), got {args.sizes[-1]}")
    if args.sweep and (args.dp_clip or args.resume or args.patience or args.track_stats):
        p.error("--sweep cannot be combined with --dp-clip, --resume, --patience or --track-stats")
    return args


# --- the run --------------------------------------------------------------------------


def _model(cfg: dict[str, Any]) -> jb.Model:
    return jb.Model(
        sizes=tuple(cfg["sizes"]),
        hidden=cfg["hidden"],
        output=cfg["output"],
        cost=cfg["cost"],
        l2=cfg["lmbda"],
        l1=cfg["l1"],
        dropout=cfg["dropout"],
    )


def _optimizer(name: str, eta: float) -> optax.GradientTransformation:
    if name == "momentum":
        return optax.sgd(eta, momentum=0.9)
    return optax.adam(eta) if name == "adam" else optax.sgd(eta)


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that define a run's result, JSON-ready."""
    cfg = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    cfg["sweep"] = {k: list(v) for k, v in (args.sweep or [])} or None
    return cfg


def _out_dir(args: argparse.Namespace) -> Path:
    if args.resume is not None:
        return args.resume
    if args.out is not None:
        return args.out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{args.dataset}-{stamp}"


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write to the output folder {out}: {err.strerror or err}. "
            "Choose another folder with --out."
        ) from None


def _load_data(args: argparse.Namespace):
    ds = data.load(args.dataset, data_dir=args.data_dir, progress=args.progress)
    X, y = ds.train
    if args.train_size is not None:
        if args.train_size > len(X):
            raise UserError(f"--train-size {args.train_size} exceeds the {len(X)} training images")
        X, y = X[: args.train_size], y[: args.train_size]
    if args.batch_size > len(X):
        raise UserError(f"--batch-size {args.batch_size} exceeds the training-set size {len(X)}")
    return (X, y), ds.validation, ds.test


def _resume_state(args, out: Path, model, optimizer, params):
    path = out / CHECKPOINT
    if not path.exists():
        raise UserError(f"--resume {out}: there is no {CHECKPOINT} in that folder")
    try:
        state, saved_model, key, saved_cfg = load_checkpoint(path, optimizer.init(params))
    except ValueError as err:
        raise UserError(f"--resume {out}: {err}") from None
    cfg = config_of(args)
    if saved_cfg != cfg or saved_model != model:
        diff = sorted(k for k in set(cfg) | set(saved_cfg) if cfg.get(k) != saved_cfg.get(k))
        raise UserError(
            f"--resume {out}: that run used another configuration (differs in "
            f"{', '.join('--' + k.replace('_', '-') for k in diff) or 'the model'}). "
            "Resume with the same flags, or start a new run with --out."
        )
    return state, key


class _Progress:
    """A bar that fills during each epoch (on a terminal), then one line per epoch."""

    WIDTH = 30

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and sys.stderr.isatty()
        self.epoch = 1

    def step(self, i, steps) -> None:
        """Called from inside the compiled epoch with the minibatch index."""
        done = int(self.WIDTH * (int(i) + 1) / max(1, int(steps)))
        bar = "#" * done + "-" * (self.WIDTH - done)
        sys.stderr.write(f"\r\033[Kepoch {self.epoch}/{self.total} [{bar}]")
        sys.stderr.flush()

    def __call__(self, rec: dict[str, float]) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        val = ""
        if "val_accuracy" in rec:
            val = f"  val cost {rec['val_cost']:.4f} acc {100 * rec['val_accuracy']:.2f}%"
        print(
            f"epoch {rec['epoch']:>3}/{self.total}  train cost {rec['train_cost']:.4f} "
            f"acc {100 * rec['train_accuracy']:.2f}%{val}  {rec['seconds']:.2f} s",
            flush=True,
        )
        self.epoch = rec["epoch"] + 1

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")


def _write_metrics(out: Path, cfg, history, best_epoch, test_accuracy, seconds, extra=None):
    metrics = {
        "config": cfg,
        "epochs": list(history),
        "best_epoch": best_epoch,
        "test_accuracy": test_accuracy,
        "seconds": seconds,
    }
    if extra:
        metrics |= extra
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())


def _install_signal_handlers(flag: dict[str, Any]):
    def handler(signum, frame):
        if flag.get("signal"):
            raise KeyboardInterrupt  # a second signal: stop at once (writes stay atomic)
        flag["signal"] = signal.Signals(signum).name
        print(
            f"\n{flag['signal']} received: finishing the current epoch and its checkpoint...",
            file=sys.stderr,
            flush=True,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, checkpoint every epoch, evaluate on the test set once; return the metrics."""
    started = time.perf_counter()
    out = _out_dir(args)
    if args.resume is not None and not (out / CHECKPOINT).is_file():
        raise UserError(f"--resume {out}: there is no {CHECKPOINT} in that folder")
    main_process = jax.process_index() == 0  # the only one that prints and writes
    if main_process:
        _prepare_out(out)
    model = _model(vars(args))
    optimizer = _optimizer(args.optimizer, args.eta)
    train, validation, test = _load_data(args)
    cfg = config_of(args)
    key = jax.random.key(args.seed)
    init_key, train_key = jax.random.split(key)
    params = jb.init_params(init_key, model, scheme=args.init)
    resume = None
    if args.resume is not None:
        resume, train_key = _resume_state(args, out, model, optimizer, params)
        if main_process:
            print(f"resuming {out} after epoch {resume.epoch}", flush=True)

    flag: dict[str, Any] = {}
    progress = _Progress(args.epochs, args.progress and main_process)
    if resume is not None:
        progress.epoch = resume.epoch + 1
    stats: list[dict[str, float]] = _previous_stats(out, resume)
    measure = _stats_tracker(model, train, args.seed) if args.track_stats else None

    def on_epoch(state: jb.TrainState) -> None:
        if not main_process:
            if flag.get("signal"):
                raise Interrupted(state.epoch)
            return
        if measure is not None:
            stats.append({"epoch": state.epoch} | measure(state.params))
            print(
                f"          median gradient norm {stats[-1]['median_grad_norm']:.4g}  "
                f"noise scale B_simple {stats[-1]['noise_scale']:.4g}",
                flush=True,
            )
        save_checkpoint(out / CHECKPOINT, state, model, train_key, cfg)
        _write_metrics(
            out,
            cfg,
            state.history,
            state.best_epoch,
            None,
            time.perf_counter() - started,
            {"grad_stats": stats} if measure else None,
        )
        if flag.get("signal"):
            raise Interrupted(state.epoch)

    gradient = _dp_gradient(args)
    restore = _install_signal_handlers(flag)
    try:
        params, history = jb.fit(
            params,
            model,
            train,
            optimizer,
            epochs=args.epochs,
            batch_size=args.batch_size,
            key=train_key,
            validation=validation,
            patience=args.patience,
            resume=resume,
            on_epoch=on_epoch,
            log=progress if main_process else None,
            gradient=gradient,
            progress=progress.step if progress.enabled and jax.process_count() == 1 else None,
        )
    except Interrupted as stop:
        progress.close()
        raise UserError(
            f"interrupted by {flag['signal']} after epoch {stop.args[0]}; the checkpoint is "
            f"{out / CHECKPOINT}. Resume with the same flags plus --resume {out}"
        ) from None
    except jb.TrainingDiverged as err:
        progress.close()
        last = out / CHECKPOINT
        kept = f" The last finite checkpoint is {last}." if last.exists() else ""
        raise UserError(f"{err}{kept}") from None
    finally:
        restore()
    progress.close()

    if not main_process:
        return {}
    best_epoch = max(history, key=lambda r: r.get("val_accuracy", 0.0))["epoch"]
    test_accuracy = jb.accuracy(params, *test, model)
    jb.save_params(out / "params.safetensors", params, model)
    seconds = time.perf_counter() - started
    extra = {"grad_stats": stats} if args.track_stats else None
    _write_metrics(out, cfg, history, best_epoch, test_accuracy, seconds, extra)
    plot_learning_curves(out / "learning_curves.png", history, _title(args))
    if args.track_stats:
        plot_grad_stats(out / "grad_stats.png", stats, _title(args))
    print(
        f"test accuracy {100 * test_accuracy:.2f}% (parameters of epoch "
        f"{best_epoch if args.patience else history[-1]['epoch']}; best validation epoch "
        f"{best_epoch})\noutputs in {out}/: metrics.json, learning_curves.png, "
        f"params.safetensors",
        flush=True,
    )
    return json.loads((out / "metrics.json").read_text())


def _sweep_grid(args: argparse.Namespace) -> list[dict[str, float]]:
    """Every combination of the swept values, the other flags at their given values."""
    grid = [{"eta": args.eta, "lmbda": args.lmbda, "dropout": args.dropout, "seed": args.seed}]
    for name, values in args.sweep:
        grid = [g | {name: v} for g in grid for v in values]
    return grid


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Train every configuration at once, pick the best by validation accuracy, and touch
    the test set only for the winner."""
    started = time.perf_counter()
    out = _out_dir(args)
    _prepare_out(out)
    grid = _sweep_grid(args)
    model = _model(vars(args) | {"dropout": max(g["dropout"] for g in grid)})
    train, validation, test = _load_data(args)
    factory = {"sgd": optax.sgd, "momentum": partial(optax.sgd, momentum=0.9), "adam": optax.adam}
    print(f"training {len(grid)} configurations at once", flush=True)
    params, histories = jb.fit_many(
        jnp.stack([jax.random.key(int(g["seed"])) for g in grid]),
        model,
        train,
        args.epochs,
        args.batch_size,
        eta=[g["eta"] for g in grid],
        lmbda=[g["lmbda"] for g in grid],
        dropout=[g["dropout"] for g in grid],
        optimizer=factory[args.optimizer],
        validation=validation,
        scheme=args.init,
    )
    results = []
    for g, history in zip(grid, histories, strict=True):
        best = max(history, key=lambda r: r["val_accuracy"])
        results.append(g | {"best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"]})
        print(
            "  "
            + ", ".join(f"{k}={v}" for k, v in g.items())
            + f": best validation accuracy {100 * best['val_accuracy']:.2f}% "
            f"(epoch {best['epoch']})",
            flush=True,
        )
    win = max(range(len(grid)), key=lambda i: results[i]["best_val_accuracy"])
    winner = jax.tree.map(lambda x: x[win], params)
    winner_model = dataclasses.replace(model, l2=grid[win]["lmbda"], dropout=grid[win]["dropout"])
    test_accuracy = jb.accuracy(winner, *test, winner_model)
    jb.save_params(out / "params.safetensors", winner, winner_model)
    history = histories[win]
    _write_metrics(
        out,
        config_of(args),
        history,
        results[win]["best_epoch"],
        test_accuracy,
        time.perf_counter() - started,
        {"sweep": results, "winner": grid[win]},
    )
    plot_learning_curves(out / "learning_curves.png", history, _title(args) + " (sweep winner)")
    print(
        "winner: "
        + ", ".join(f"{k}={v}" for k, v in grid[win].items())
        + f"\ntest accuracy of the winner {100 * test_accuracy:.2f}%\noutputs in {out}/",
        flush=True,
    )
    return json.loads((out / "metrics.json").read_text())


STATS_SAMPLE = 1000


def _stats_tracker(model: jb.Model, train, seed: int):
    """Per-epoch gradient statistics on a fixed sample of training examples."""
    X, y = train
    ids = np.random.default_rng(seed).choice(len(X), min(STATS_SAMPLE, len(X)), replace=False)
    Xs, ys = X[np.sort(ids)], y[np.sort(ids)]

    def measure(params) -> dict[str, float]:
        s = jb.noise_scale(params, Xs, ys, model, n=len(X))
        return {"median_grad_norm": s.median_norm, "noise_scale": s.b_simple}

    return measure


def _title(args: argparse.Namespace) -> str:
    sizes = "-".join(map(str, args.sizes))
    return (
        f"{args.dataset} {sizes} {args.hidden}/{args.output} {args.cost}, η={args.eta}, "
        f"λ={args.lmbda}, minibatch {args.batch_size}"
    )


def _previous_stats(out: Path, resume) -> list[dict[str, float]]:
    """On resumption, the statistics already recorded for the finished epochs."""
    if resume is None or not (out / "metrics.json").exists():
        return []
    try:
        old = json.loads((out / "metrics.json").read_text()).get("grad_stats") or []
    except (OSError, ValueError):
        return []
    return [r for r in old if r["epoch"] <= resume.epoch]


def _dp_gradient(args: argparse.Namespace):
    if args.dp_clip is None:
        return None
    from jbackprop.privacy import DPGradient

    return DPGradient(clip=args.dp_clip, noise_multiplier=args.dp_noise)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code = _main(args)
    if code and jax.process_count() > 1:
        # jax.distributed's exit handler waits at a barrier for every peer, and a failed
        # peer never arrives: leave now, with the message already printed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(args: argparse.Namespace) -> int:
    try:
        if distributed.requested(args.coordinator, args.num_processes, args.process_id):
            distributed.init(args.coordinator, args.num_processes, args.process_id, args.timeout)
        run_sweep(args) if args.sweep else run(args)
    except (UserError, distributed.JoinError, data.DataError, ValueError, OSError) as err:
        if args.debug:
            traceback.print_exc()
        message = str(err) if not isinstance(err, OSError) else _os_message(err)
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("error: interrupted; checkpoints on disk are intact", file=sys.stderr)
        return 130
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        if args.debug:
            traceback.print_exc()
        addr = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
        reason = str(err).strip().splitlines()[0]
        print(
            f"error: process {jax.process_index()} of {jax.process_count()} (coordinator "
            f"{addr}) lost contact with its peers: another process failed or became "
            f"unreachable ({reason}). Checkpoints on disk are intact; resume all processes "
            "with --resume.",
            file=sys.stderr,
        )
        return 1
    return 0


def _os_message(err: OSError) -> str:
    where = f" ({err.filename})" if err.filename else ""
    return f"{err.strerror or err}{where}"


if __name__ == "__main__":
    sys.exit(main())
