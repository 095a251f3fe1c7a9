"""Training over several devices and processes: a mesh with one axis, ``"batch"``.

Parameters, optimizer state and the training data are replicated on every device (of every
process); each step's minibatch is sharded over the batch axis inside the compiled epoch,
and XLA inserts the gradient all-reduce. Evaluation data is split over the devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import Array
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jbackprop.checks import Data

__all__ = ["batch_constraint", "local", "place_data", "replicate", "resolve_mesh"]


def resolve_mesh(devices: Any) -> Mesh | None:
    """The mesh ``fit(..., devices=...)`` trains on.

    Args:
      devices: ``None``, ``"all"``, a list of devices or a ``Mesh`` with axis ``"batch"``.

    Returns:
      ``None`` for the default device (unless ``jax.distributed`` spans several processes,
      which trains over all of them), otherwise a mesh over the devices.
    """
    if devices is None and jax.process_count() > 1:
        devices = "all"  # jax.distributed is initialised: train over every process
    if devices is None:
        return None
    if isinstance(devices, Mesh):
        return devices
    devs = jax.devices() if devices == "all" else list(devices)
    if not devs:
        raise ValueError("devices is empty: give None, 'all', a list of devices or a Mesh")
    return Mesh(np.array(devs), ("batch",))


def batch_constraint(mesh: Mesh | None, size: int) -> Callable[[Array], Array]:
    """Shard a minibatch over the mesh's batch axis when it divides evenly.

    Args:
      mesh: the training mesh, or ``None``.
      size: the minibatch's rows.

    Returns:
      A function applying the sharding constraint to a minibatch array (the identity
      without a mesh or when ``size`` does not divide evenly).
    """
    if mesh is None or size % mesh.size:
        return lambda x: x
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def _on_mesh(x, mesh: Mesh, spec: PartitionSpec):
    """A global array laid out by ``spec`` on ``mesh``, built from this process's full copy
    (every process holds the same values; each fills the shards on its own devices)."""
    host = np.asarray(local(x))
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), host.__getitem__)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Place ``tree`` on every device of ``mesh``, across processes if it spans several.

    Args:
      tree: a pytree of arrays, or ``None``.
      mesh: the training mesh; without one ``tree`` is returned as it is.

    Returns:
      ``tree`` with every leaf replicated over the mesh.
    """
    if mesh is None or tree is None:
        return tree
    return jax.tree.map(lambda x: _on_mesh(x, mesh, PartitionSpec()), tree)


def place_data(data: Data | None, mesh: Mesh | None, shard: bool) -> Data | None:
    """Training data replicated (each step gathers its rows from a global shuffle);
    evaluation data split over the batch axis when it divides evenly, so every device
    evaluates only its part.

    Args:
      data: a checked data set, or ``None``.
      mesh: the training mesh; without one ``data`` is returned as it is.
      shard: split the rows over the batch axis (evaluation) rather than replicate them.

    Returns:
      ``data`` with its arrays placed on the mesh.
    """
    if data is None or mesh is None:
        return data
    spec = PartitionSpec("batch") if shard and data.n % mesh.size == 0 else PartitionSpec()
    arrays = (data.X, data.Y, data.labels)
    return Data(*(_on_mesh(x, mesh, spec) for x in arrays), data.n)


def local(tree: Any) -> Any:
    """This process's copy of replicated arrays, usable outside the mesh (saving, eval).

    Args:
      tree: a pytree whose leaves may be global arrays spanning several processes.

    Returns:
      ``tree`` with each such leaf replaced by the copy on this process's first device.
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.addressable_data(0)
        return x

    return jax.tree.map(one, tree)
