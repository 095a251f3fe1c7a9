"""Saving parameters and training checkpoints in a safe format (safetensors, never pickle).

A parameter file holds ``layer{l}.w`` and ``layer{l}.b`` tensors and, in the safetensors
metadata, the model's configuration as JSON, so :func:`load_params` rebuilds both and
checks that they belong together. A checkpoint adds the optimizer state (flattened in
tree order), the PRNG key, the epoch and the history: all that :func:`jbackprop.fit`
needs to resume bit-identically.

Every write goes to a temporary file in the target folder, is flushed to disk with
``fsync`` and then renamed over the final name, so a crash at any instant leaves either
the old file or the new one, never a torn one. That one helper, :func:`atomic_file`, also
serves the data downloads of :mod:`jbackprop.data`.

This module knows the :class:`~jbackprop.Model` and :class:`~jbackprop.state.TrainState`
types only; it imports nothing of the network or of training. The quantities that accept
paths to parameter files (:func:`jbackprop.attribution.tracin`) sit below it, so it lends
them its reader through the internal ``checks`` module instead of being imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from jbackprop import checks
from jbackprop.model import Model, Params
from jbackprop.state import TrainState

__all__ = [
    "atomic_file",
    "atomic_write",
    "load_checkpoint",
    "load_params",
    "save_checkpoint",
    "save_params",
]

FORMAT = "jbackprop.params/1"
CHECKPOINT_FORMAT = "jbackprop.checkpoint/1"


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike, suffix: str = ".tmp", check: Callable[[Path], None] | None = None
) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit, flush it to disk,
    run ``check`` on the temporary path (downloads verify their checksum there) and rename
    it over ``path``; on any exception, delete it.

    ``path`` is therefore never left half-written: a crash at any instant leaves either
    the old file or the new one.

    Args:
      path: the final file; its folder must exist.
      suffix: the temporary file's suffix (``".part"`` for downloads).
      check: called with the temporary file's path before the rename; an exception it
        raises deletes the file and propagates.

    Yields:
      The temporary file, open for binary writing.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 -> what open() gives
            yield f
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`.

    Args:
      path: the final file; its folder must exist.
      data: the whole content.
    """
    with atomic_file(path) as f:
        f.write(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable; best effort (not every platform allows it).

    Args:
      folder: the folder whose entries were just renamed or created.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _param_tensors(params: Params) -> dict[str, np.ndarray]:
    return {
        f"layer{l}.{name}": np.asarray(layer[name])
        for l, layer in enumerate(params, start=1)
        for name in ("w", "b")
    }


# safetensors' NumPy reader has no bfloat16, so those tensors are stored as their raw
# 16 bits and named in the metadata, to be viewed back as bfloat16 when read.
_BF16_KEY = "bfloat16_tensors"


def _encode(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    bf16 = sorted(k for k, v in tensors.items() if v.dtype == jnp.bfloat16)
    raw = {k: (v.view(np.uint16) if k in bf16 else v) for k, v in tensors.items()}
    return raw, ({_BF16_KEY: json.dumps(bf16)} if bf16 else {})


def _decode(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> dict[str, np.ndarray]:
    for k in json.loads(meta.get(_BF16_KEY, "[]")):
        if k in tensors:
            tensors[k] = tensors[k].view(jnp.bfloat16)
    return tensors


def _save(path: str | os.PathLike, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    raw, extra = _encode(tensors)
    atomic_write(path, save(raw, metadata=meta | extra))


def save_params(path: str | os.PathLike, params: Params, model: Model) -> Path:
    """Save ``params`` with ``model``'s configuration to ``path`` (safetensors).

    Args:
      path: the file to write, atomically (conventionally ``*.safetensors``).
      params: one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer, tuple or list;
        their dtype is kept, ``bfloat16`` included.
      model: the model they belong to; :meth:`~jbackprop.Model.to_dict` is stored, so its
        ``l2``, ``l1`` and dropout rate are saved too.

    Returns:
      ``path`` as a :class:`~pathlib.Path`.

    Raises:
      ValueError: ``params`` does not fit ``model``.
      OSError: the file cannot be written (e.g. its folder does not exist).
    """
    checks.check_params(params, model)
    meta = {"format": FORMAT, "model": json.dumps(model.to_dict())}
    _save(path, _param_tensors(params), meta)
    return Path(path)


def _read(path: str | os.PathLike, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} file {path} does not exist") from None
    except OSError as err:
        raise ValueError(f"cannot read {what} file {path}: {err.strerror or err}") from None
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not a valid {what} file (corrupt or truncated safetensors): {err}"
        ) from None
    return _decode(tensors, meta), meta


def _model_from(meta: dict[str, str], path: Path, fmt: str) -> Model:
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a jbackprop file of kind {fmt!r}")
    try:
        return Model.from_dict(json.loads(meta["model"]))
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path} holds an invalid model configuration: {err}") from None


def _params_from(tensors: dict[str, np.ndarray], model: Model, path: Path) -> Params:
    want = {f"layer{l}.{n}" for l in range(1, model.num_layers + 1) for n in ("w", "b")}
    got = {k for k in tensors if k.startswith("layer")}
    if got != want:
        raise ValueError(
            f"{path} holds tensors {sorted(got)}, but a model with sizes {model.sizes} "
            f"needs {sorted(want)}"
        )
    params = tuple(
        {"w": jnp.asarray(tensors[f"layer{l}.w"]), "b": jnp.asarray(tensors[f"layer{l}.b"])}
        for l in range(1, model.num_layers + 1)
    )
    try:
        checks.check_params(params, model)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return params


def load_params(path: str | os.PathLike, model: Model | None = None) -> tuple[Params, Model]:
    """Read parameters saved by :func:`save_params`; return ``(params, model)``.

    If ``model`` is given, the file must describe the same network (layer count, sizes,
    activations, cost), otherwise a ``ValueError`` says how they differ.

    Args:
      path: a file written by :func:`save_params`.
      model: the expected network, or None to take the file's. Its ``l2``, ``l1`` and
        dropout rate need not match the file's.

    Returns:
      ``(params, model)``: a tuple with one ``{"w": (n_l, n_{l-1}), "b": (n_l,)}`` dict of
      JAX arrays per layer, in the dtype they were saved in, and the given ``model`` or,
      without one, the model rebuilt from the file.

    Raises:
      ValueError: the file is missing, unreadable, corrupt or not a parameter file, or it
        holds another network than ``model``.
    """
    path = Path(path)
    tensors, meta = _read(path, "parameter")
    saved = _model_from(meta, path, FORMAT)
    if model is not None and _structure(model) != _structure(saved):
        raise ValueError(
            f"{path} holds parameters of the model {saved.to_dict()}, not of the "
            f"requested {model.to_dict()}"
        )
    return _params_from(tensors, saved, path), (model or saved)


def _structure(model: Model) -> tuple:
    return model.sizes, model.hidden, model.output, model.cost


# The quantities below this module that take paths to parameter files read them through
# checks.read_params (they may not import io).
checks.set_params_reader(lambda path, model: load_params(path, model)[0])


# --- checkpoints ----------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike, state: TrainState, model: Model, key: jax.Array, config: dict
) -> Path:
    """Save everything needed to resume training after ``state.epoch`` epochs.

    ``config`` is a JSON-ready description of the run (the experiment's flags); resuming
    compares it so that a checkpoint is never continued under another configuration.

    Args:
      path: the file to write, atomically.
      state: the :class:`~jbackprop.TrainState` after ``state.epoch`` epochs; its
        ``best_params`` default to its ``params``.
      model: the model being trained (its configuration is stored).
      key: the run's PRNG key, typed (``jax.random.key``) or raw; it is stored with its
        implementation.
      config: a JSON-serialisable dict.

    Returns:
      ``path`` as a :class:`~pathlib.Path`.

    Raises:
      OSError: the file cannot be written.
    """
    tensors = _param_tensors(state.params)
    best = state.best_params if state.best_params is not None else state.params
    tensors |= {f"best.{k}": v for k, v in _param_tensors(best).items()}
    for i, leaf in enumerate(jax.tree.leaves(state.opt_state)):
        tensors[f"opt.{i:04d}"] = np.asarray(leaf)
    tensors["key"] = np.asarray(jax.random.key_data(key))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "model": json.dumps(model.to_dict()),
        "config": json.dumps(config, sort_keys=True),
        "epoch": str(state.epoch),
        "best_epoch": str(state.best_epoch),
        "history": json.dumps(list(state.history)),
        "key_impl": str(jax.random.key_impl(key)) if _typed(key) else "",
    }
    _save(path, tensors, meta)
    return Path(path)


def _typed(key: jax.Array) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def load_checkpoint(
    path: str | os.PathLike, opt_template: Any
) -> tuple[TrainState, Model, jax.Array, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
      path: the checkpoint file.
      opt_template: ``optimizer.init(params)`` for the optimizer that will continue: it
        gives the tree structure, shapes and dtypes of the optimizer state.

    Returns:
      ``(state, model, key, config)``: the :class:`~jbackprop.TrainState` (``params`` and
      ``best_params`` as tuples of ``{"w", "b"}`` dicts in their saved dtype), the model,
      the PRNG key (typed again if it was saved typed) and the run's ``config`` dict.

    Raises:
      ValueError: the file is missing, unreadable, corrupt or not a checkpoint, or the
        optimizer state does not match ``opt_template``.
    """
    path = Path(path)
    tensors, meta = _read(path, "checkpoint")
    model = _model_from(meta, path, CHECKPOINT_FORMAT)
    params = _params_from(tensors, model, path)
    best = _params_from(
        {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}, model, path
    )
    leaves, treedef = jax.tree.flatten(opt_template)
    opt = [tensors.get(f"opt.{i:04d}") for i in range(len(leaves))]
    saved = sum(k.startswith("opt.") for k in tensors)
    if (
        saved != len(leaves)
        or any(o is None for o in opt)
        or any(np.shape(o) != np.shape(t) for o, t in zip(opt, leaves, strict=True))
    ):
        raise ValueError(f"{path}: the optimizer state does not match this optimizer")
    opt_state = jax.tree.unflatten(
        treedef,
        [jnp.asarray(o, dtype=jnp.result_type(t)) for o, t in zip(opt, leaves, strict=True)],
    )
    key = jnp.asarray(tensors["key"])
    if meta.get("key_impl"):
        key = jax.random.wrap_key_data(key, impl=meta["key_impl"])
    state = TrainState(
        params=params,
        opt_state=opt_state,
        epoch=int(meta["epoch"]),
        history=tuple(json.loads(meta["history"])),
        best_params=best,
        best_epoch=int(meta["best_epoch"]),
    )
    return state, model, key, json.loads(meta["config"])
