"""The command line: flags in, exit status out.

:func:`main` parses the flags (a mistake is one line on stderr and exit status 2), then
trains one network (:mod:`.run`) or a sweep (:mod:`.sweep`). Errors the user can act on
(bad data, an unwritable folder, a checkpoint of another run, divergence, an interrupt)
become one ``error: ...`` line on stderr and exit status 1, without a traceback unless
``--debug`` asks for it; a second Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import jax

from jbackprop import activations, costs, data
from jbackprop import privacy as jb_privacy
from jbackprop.experiments import argtypes, distributed
from jbackprop.experiments.mnist.accounting import DP_ACCOUNTANT, DP_DELTA, SAMPLINGS
from jbackprop.experiments.mnist.config import OPTIMIZERS, UserError, model_of
from jbackprop.experiments.mnist.run import run
from jbackprop.experiments.mnist.sweep import HYPERPARAMETERS, run_sweep

PROG = "python -m jbackprop.experiments.mnist"
SCRIPT = "jbackprop-mnist"  # the console script pyproject.toml installs

DESCRIPTION = """\
Train a fully-connected network by hand-written backprop on MNIST or Fashion-MNIST.
The first 50,000 training images train it and the last 10,000 validate it after every
epoch; the test set is read once, after training.
"""

EPILOG = """\
examples:
  %(prog)s --epochs 30 --out runs/ch3
      the book's chapter-3 network (the defaults): 784-100-10 sigmoid, cross-entropy,
      L2 with λ = 5.0, η = 0.5, minibatch 10
  %(prog)s --epochs 30 --resume runs/ch3
      continue that run after an interruption: the same flags, --resume for --out
  %(prog)s --sweep eta=0.1,0.5,1.0 --sweep lmbda=1,5
      6 models trained at once; the one with the best validation accuracy is tested
  %(prog)s --batch-size 600 --lmbda 0 --dp-clip 4 --dp-epsilon 2 --epochs 10
      DP-SGD that states its ε: the noise σ is calibrated so that 10 epochs of
      Poisson-sampled lots of 600 spend ε = 2 at δ = 1e-5 (experiments/README.md adds
      Abadi et al.'s private PCA: --pca 60 --sizes 60 ... --dp-pca-noise S)

--lmbda is spelled as in Nielsen's book (lambda is a Python keyword): the L2 strength λ,
which adds λ/(2n) Σ w² to the cost, the l2 of jbackprop.Model.

A run folder receives metrics.json, learning_curves.png, params.safetensors (and with
--pca, pca.safetensors: the projection the model's inputs pass through) and, after every
epoch, checkpoint.safetensors, which --resume continues exactly where it stopped.

DP-SGD (--dp-clip) samples every step's lot by Poisson sampling, the mechanism the
accountants (RDP or PLD, from dp-accounting) assume, and states the ε spent after every
epoch and in metrics.json; with --dp-sampling shuffle no ε is claimed.
"""


# --- value types: each turns one flag's text into a checked value ------------------------


_POSITIVE = argtypes.number(0, low_open=True)
_NONNEGATIVE = argtypes.number(0)
_RATE = argtypes.number(0, 1)
_DELTA = argtypes.number(0, 1, low_open=True)

# The type of each flag --sweep can vary: a swept value is checked as the flag's value is.
SWEEP_TYPES = {
    "eta": _POSITIVE,
    "lmbda": _NONNEGATIVE,
    "l1": _NONNEGATIVE,
    "dropout": _RATE,
    "seed": argtypes.integer,
}


def _clip(text: str) -> float | list[float]:
    """``--dp-clip``: one bound ``C``, or one per layer separated by commas (``4,4``)."""
    try:
        bounds = [_POSITIVE(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(
            f"expected one bound or comma-separated per-layer bounds: {err}"
        ) from None
    return bounds[0] if len(bounds) == 1 else bounds


def _activation(text: str) -> str:
    try:
        return activations.get(text).spec
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _sweep(text: str) -> tuple[str, tuple[float, ...]]:
    name, _, values = text.partition("=")
    if name not in SWEEP_TYPES or not values:
        raise argparse.ArgumentTypeError(
            f"expected NAME=V1,V2,... with NAME one of {', '.join(HYPERPARAMETERS)}, got {text!r}"
        )
    try:
        parsed = tuple(SWEEP_TYPES[name](v) for v in values.split(","))
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"--sweep {name}: {err}") from None
    return name, parsed


# --- the parser ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line naming the problem, instead of the whole usage text."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _prog() -> str:
    """How the user started us: the console script, or ``python -m``."""
    return SCRIPT if Path(sys.argv[0]).name == SCRIPT else PROG


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The epilog's examples keep their lines, and a flag's help (still wrapped) ends with
    its default, unless the flag has none (``None``, an on/off switch) or says it itself."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=30)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    """The experiment's flags, each with its default in its help."""
    p = _Parser(
        prog=_prog(), description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter
    )
    positive, integer = argtypes.positive_int, argtypes.integer

    # One line a flag, or its help's lines under it: the flags read as a table.
    # fmt: off

    net = p.add_argument_group("network").add_argument
    net("--dataset", choices=data.DATASETS, default="mnist", help="the images to learn")
    net("--sizes", type=positive, nargs="+", default=[784, 100, 10], metavar="N",
        help="layer widths: 784 inputs first, 10 outputs last (default: 784 100 10)")
    net("--hidden", type=_activation, default="sigmoid", metavar="NAME",
        help=f"hidden activation: one of {', '.join(activations.names())}; "
        "leaky_relu(SLOPE) sets its slope")
    net("--output", type=_activation, default="sigmoid", metavar="NAME",
        help="output activation, the same names")
    net("--cost", choices=costs.names(), default="cross_entropy",
        help="log_likelihood needs --output softmax")
    net("--init", choices=("normal", "scaled"), default="scaled",
        help="weights N(0, 1/n_in) (scaled) or N(0, 1) (normal, the book's chapter 1); "
        "biases N(0, 1)")

    train = p.add_argument_group("training").add_argument
    train("--eta", type=_POSITIVE, default=0.5, help="learning rate η")
    train("--eta-end", type=_POSITIVE, metavar="ETA",
          help="let the learning rate fall linearly, step by step, from --eta to ETA over the "
          "first --eta-decay-epochs epochs, then stay at ETA (default: constant --eta)")
    train("--eta-decay-epochs", type=positive, metavar="N",
          help="epochs over which the learning rate falls to --eta-end (default: none)")
    train("--lmbda", type=_NONNEGATIVE, default=5.0,
          help="L2 regularisation λ, the book's spelling; Model's l2")
    train("--l1", type=_NONNEGATIVE, default=0.0, help="L1 regularisation λ")
    train("--dropout", type=_RATE, default=0.0,
          help="probability of dropping a hidden unit in training")
    train("--batch-size", type=positive, default=10, help="minibatch size")
    train("--epochs", type=positive, default=30, help="epochs to train")
    train("--optimizer", choices=tuple(OPTIMIZERS), default="sgd",
          help="plain SGD, SGD with momentum 0.9, or Adam, each with step η")
    train("--seed", type=integer, default=0,
          help="seeds initialisation, shuffles and dropout masks")
    train("--train-size", type=positive, metavar="N",
          help="train on the first N training images only (default: all 50,000)")
    train("--no-validation", action="store_true", default=None,
          help="train on all 60,000 training images, the 10,000 validation ones included, "
          "and validate nothing (default: validate on the last 10,000)")
    train("--patience", type=positive, metavar="N",
          help="stop after N epochs without a better validation accuracy, keeping the best "
          "epoch's parameters (default: train every epoch)")
    train("--sweep", type=_sweep, action="append", metavar="NAME=V1,V2,...",
          help=f"train one model per value, all at once; NAME is one of "
          f"{', '.join(HYPERPARAMETERS)}; repeat the flag for a grid of every combination "
          "(default: no sweep)")

    dp = p.add_argument_group("private training (DP-SGD)").add_argument
    dp("--dp-clip", type=_clip, metavar="C",
       help="clip every example's gradient to norm C; C1,C2,... (one bound per layer, "
       "comma-separated, no spaces) clips each layer's gradient to its own bound, and the "
       "noise is then scaled to sqrt(C1²+C2²+...) (default: no clipping)")
    dp("--dp-noise", type=_NONNEGATIVE, metavar="SIGMA",
       help="add Gaussian noise of deviation SIGMA*C to the summed clipped gradients "
       "(default: 0.0)")
    dp("--dp-epsilon", type=_POSITIVE, metavar="EPS",
       help="instead of --dp-noise, the smallest SIGMA that spends at most EPS over --epochs "
       "(with the private PCA, if any) at --dp-delta (default: none)")
    dp("--dp-delta", type=_DELTA, metavar="DELTA",
       help=f"the δ of the (ε, δ) stated; keep it below 1/n (default: {DP_DELTA})")
    dp("--dp-accountant", choices=jb_privacy.ACCOUNTANTS,
       help="Rényi DP (fast) or privacy-loss distributions (tighter, slower) "
       f"(default: {DP_ACCOUNTANT})")
    dp("--dp-sampling", choices=SAMPLINGS,
       help="Poisson-sampled lots, each example in each with probability batch-size/n, as "
       "the accountants assume; or shuffled minibatches, for which no ε is claimed "
       "(default: poisson)")
    dp("--dp-pca-noise", type=_POSITIVE, metavar="S",
       help="with --pca: make the projection private by Gaussian noise of deviation S on the "
       "covariance; its ε is part of the ε stated (default: none)")

    extras = p.add_argument_group("inputs and statistics").add_argument
    extras("--pca", type=positive, metavar="K",
           help="project the inputs on the top K principal directions of the training images "
           "(rows scaled to norm at most 1); --sizes must then start with K (default: none)")
    extras("--track-stats", action="store_true",
           help="after every epoch, record the median per-example gradient norm and the "
           "gradient noise scale (grad_stats.png)")

    files = p.add_argument_group("files").add_argument
    files("--resume", type=Path, metavar="DIR", help="continue the run saved in DIR")
    files("--out", type=Path, metavar="DIR",
          help="run folder (default: runs/<dataset>-<date>-<time>)")
    files("--data-dir", type=Path, metavar="DIR",
          help="folder holding the four IDX .gz files (default: $JBACKPROP_DATA/<dataset>, "
          "then the user cache, then /usr/share/datasets/<dataset>, else download)")

    multi = p.add_argument_group("several processes (jax.distributed)").add_argument
    multi("--coordinator", metavar="HOST:PORT", help="process 0's address")
    multi("--num-processes", type=positive, metavar="N", help="how many")
    multi("--process-id", type=integer, metavar="I", help="this process's index, 0..N-1")
    multi("--timeout", type=positive, default=120, metavar="S",
          help="seconds to wait for the peers")

    # fmt: on
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the flags; a mistake exits with status 2 and one line."""
    p = parser()
    args = p.parse_args(argv)
    try:
        model_of(vars(args))
    except ValueError as err:
        p.error(str(err).removeprefix("Model: "))
    if message := _inconsistency(args):
        p.error(message)
    if args.dp_noise is None and args.dp_epsilon is None:
        args.dp_noise = 0.0  # the flag's default, as run folders have always recorded it
    return args


def _inconsistency(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags taken together, or None."""
    return (
        _sizes_problem(args)
        or _privacy_problem(args)
        or _schedule_problem(args)
        or _sweep_problem(args)
        or _validation_problem(args)
    )


def _validation_problem(args: argparse.Namespace) -> str | None:
    if args.no_validation and (args.patience or args.sweep):
        return "--patience and --sweep need a validation set: drop --no-validation"
    return None


def _sizes_problem(args: argparse.Namespace) -> str | None:
    if args.pca is not None and args.pca > 784:
        return f"--pca {args.pca} exceeds the 784 pixels of an image"
    width = 784 if args.pca is None else args.pca
    if args.sizes[0] != width:
        why = "28x28 pixels" if args.pca is None else "the --pca dimension"
        return f"--sizes must start with {width} ({why}), got {args.sizes[0]}"
    if args.sizes[-1] != 10:
        return f"--sizes must end with 10 (one output per class), got {args.sizes[-1]}"
    return None


def _privacy_problem(args: argparse.Namespace) -> str | None:
    dp_only = ("dp_noise", "dp_epsilon", "dp_delta", "dp_accountant", "dp_sampling", "dp_pca_noise")
    if args.dp_clip is None:
        given = [_flag(name) for name in dp_only if getattr(args, name) is not None]
        return f"{given[0]} needs --dp-clip (DP-SGD is off without it)" if given else None
    if args.dp_epsilon is not None and args.dp_noise is not None:
        return (
            "--dp-epsilon and --dp-noise are mutually exclusive: give the noise SIGMA, or the "
            "ε to calibrate it to"
        )
    layers = len(args.sizes) - 1
    if isinstance(args.dp_clip, list) and len(args.dp_clip) != layers:
        return (
            f"--dp-clip gives {len(args.dp_clip)} bounds, but the network has {layers} "
            f"layers: give one bound, or {layers} separated by commas"
        )
    if args.dp_epsilon is not None and args.dp_sampling == "shuffle":
        return "--dp-epsilon needs Poisson sampling: no ε is claimed with --dp-sampling shuffle"
    if args.pca is not None and args.dp_pca_noise is None:
        return (
            "--pca with --dp-clip needs --dp-pca-noise S: a projection computed without "
            "noise would leak the training images past the ε stated"
        )
    if args.dp_pca_noise is not None and args.pca is None:
        return "--dp-pca-noise needs --pca K"
    return None


def _schedule_problem(args: argparse.Namespace) -> str | None:
    if (args.eta_end is None) != (args.eta_decay_epochs is None):
        return "--eta-end and --eta-decay-epochs go together: give both or neither"
    return None


def _sweep_problem(args: argparse.Namespace) -> str | None:
    if not args.sweep:
        return None
    if args.dp_clip or args.resume or args.patience or args.track_stats or args.eta_end:
        return (
            "--sweep cannot be combined with --dp-clip, --resume, --patience, --track-stats "
            "or --eta-end"
        )
    names = [name for name, _ in args.sweep]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        return f"--sweep {twice[0]} is given twice; list all its values in one flag"
    return None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- running -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the experiment with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
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
        if args.sweep:
            run_sweep(args)
        else:
            run(args)
    except (UserError, distributed.JoinError, data.DataError, ValueError, OSError) as err:
        _debug(args)
        message = str(err) if not isinstance(err, OSError) else _os_message(err)
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _debug(args)
        print("error: interrupted; checkpoints on disk are intact", file=sys.stderr)
        return 130
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        _debug(args)
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


def _debug(args: argparse.Namespace) -> None:
    """With --debug, the traceback of the exception being handled."""
    if args.debug:
        traceback.print_exc()


def _os_message(err: OSError) -> str:
    where = f" ({err.filename})" if err.filename else ""
    return f"{err.strerror or err}{where}"
