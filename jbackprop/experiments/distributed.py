"""Joining JAX's multi-controller runtime (``jax.distributed``) from the command line."""

from __future__ import annotations

import os
import sys
import threading

import jax

__all__ = ["JoinError", "init", "requested"]


class JoinError(Exception):
    """This process could not join the multi-process run."""


def requested(coordinator: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Whether this process is one of several: flags, JAX's variable, or a cluster launcher."""
    if coordinator or num_processes or process_id is not None:
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    # Launchers JAX detects by itself (SLURM, Open MPI), when they run several tasks.
    return any(_env_int(v) not in (None, 0, 1) for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def init(
    coordinator: str | None, num_processes: int | None, process_id: int | None, timeout: int
) -> None:
    """``jax.distributed.initialize`` with what the flags or the environment give.

    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` stand in for
    missing flags; whatever is still missing JAX detects itself (SLURM, Open MPI, TPU).
    """
    addr = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = num_processes or _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if num is not None and pid is not None and not 0 <= pid < num:
        raise JoinError(f"--process-id {pid} must lie in 0..{num - 1} (--num-processes {num})")
    # CPU processes talk over gloo; GPUs and TPUs use their own collectives regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    message = (
        f"process {pid} could not join the run coordinated at {addr} within {timeout} s. "
        "Check that every process got the same --coordinator and --num-processes, and that "
        "process 0 is running and reachable."
    )
    # JAX aborts the whole process (no exception) when the coordinator stays unreachable,
    # so a watchdog that fires first gives the user a message instead of a C++ trace.
    watchdog = threading.Timer(timeout, _give_up, (f"error: {message}",))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=addr,
            num_processes=num,
            process_id=pid,
            initialization_timeout=timeout + 30,
            heartbeat_timeout_seconds=max(10, timeout // 4),
        )
    except Exception as err:  # JAX raises several types here; all mean "could not join"
        raise JoinError(f"{message} ({err})") from None
    finally:
        watchdog.cancel()


def _give_up(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return None if value is None else int(value)
    except ValueError:
        raise JoinError(f"environment variable {name} must be an integer, got {value!r}") from None
