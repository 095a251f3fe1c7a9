"""What the tests of ``python -m jbackprop.experiments.mnist`` share: running it as a
subprocess, as a user starts it, and reading the one-line error a mistaken flag gives."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jbackprop.experiments import mnist

CLI = [sys.executable, "-m", "jbackprop.experiments.mnist"]
ENV = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 240


def cli(*args, cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run the experiment with ``args`` in ``cwd`` to its end."""
    return subprocess.run(
        [*CLI, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def main_in_process(*args) -> subprocess.CompletedProcess:
    """``main(args)`` in this process, its output captured: what :func:`cli` returns, less
    the start-up of a new process."""
    argv = [*map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = mnist.main(argv)
    return subprocess.CompletedProcess([*CLI, *argv], code, out.getvalue(), err.getvalue())


def finished_run(
    tmp_path_factory: pytest.TempPathFactory, name: str, *args
) -> tuple[Path, subprocess.CompletedProcess]:
    """A run with ``args`` that succeeded, in the fresh folder ``<name>/run``:
    ``(folder, CompletedProcess)``."""
    base = tmp_path_factory.mktemp(name)
    proc = cli(*args, "--out", base / "run", cwd=base)
    assert proc.returncode == 0, proc.stderr
    return base / "run", proc


def signal_after(args, pattern: str, sig: int, cwd: Path):
    """Start the experiment, send ``sig`` once a stdout line matches ``pattern``, wait for
    the end.

    Returns ``(returncode, stdout, stderr, matched_line)``.
    """
    proc = subprocess.Popen(
        [*CLI, *map(str, args)], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    lines, matched = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                matched = line
                proc.send_signal(sig)
                break
        lines.append(proc.stdout.read())
        stderr = proc.stderr.read()
        returncode = proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
        proc.stderr.close()
    assert matched is not None, f"no line matched {pattern!r}:\n{''.join(lines)}\n{stderr}"
    return returncode, "".join(lines), stderr, matched


def flag_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """What ``main(argv)`` writes for a flag mistake: exit status 2, one line on stderr
    naming the command."""
    with pytest.raises(SystemExit) as info:
        mnist.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m jbackprop.experiments.mnist: error:")
    return err
