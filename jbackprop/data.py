"""MNIST and Fashion-MNIST: verified IDX readers, discovery on disk, download, and splits.

The data sets come as four gzip-compressed IDX files each. Every file is checked against
a table of *payload* checksums (size and SHA-256 of the decompressed bytes), so any
faithful copy passes however it was recompressed (Debian recompressed Fashion-MNIST), and
a truncated, corrupt or wrong file is reported with a message naming the file.

Discovery order for a data set: an explicit ``data_dir``; ``$JBACKPROP_DATA/<dataset>/``;
the user cache ``$XDG_CACHE_HOME/jbackprop/<dataset>/`` (default ``~/.cache``);
``/usr/share/datasets/<dataset>/`` (Debian's ``dataset-fashion-mnist``); otherwise the
files are downloaded into the user cache.

The splits follow Michael Nielsen's book: the first 50,000 training images for training,
the last 10,000 for validation, the 10,000 test images for the test set. Arrays are numpy,
so the caller decides on device placement.

Every failure a user can cause or meet (a missing, truncated or corrupt file, an unknown
data set, an unwritable folder, an unreachable mirror) is a :class:`DataError` whose
message names the file or folder and says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import os
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO

import numpy as np

from jbackprop.io import atomic_file, fsync_dir

__all__ = [
    "CHECKSUMS",
    "DATASETS",
    "FILES",
    "MIRRORS",
    "DataError",
    "FileSpec",
    "Splits",
    "cache_dir",
    "candidate_dirs",
    "download",
    "find",
    "load",
    "read_images",
    "read_labels",
]

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
ROWS = COLS = 28
NUM_CLASSES = 10
VALIDATION_SIZE = 10_000  # the last images of the training file, as in Nielsen's book

ENV_VAR = "JBACKPROP_DATA"
SYSTEM_DIR = Path("/usr/share/datasets")
TIMEOUT_S = 30.0
_CHUNK = 1 << 16


class DataError(Exception):
    """A data set file is missing, malformed, fails its checksum, or cannot be fetched.

    Raised with one message (``DataError(message)``) that names the file or folder.
    """


@dataclass(frozen=True)
class FileSpec:
    """What a faithful file decompresses to: payload byte count and SHA-256.

    ``gz_sha256`` records the upstream compressed file for reference only; it is not
    checked, because repackaged copies are recompressed.

    Attributes:
      size: the decompressed payload's length in bytes.
      sha256: the payload's SHA-256, lowercase hex.
      gz_sha256: the upstream ``.gz`` file's SHA-256, or None.
    """

    size: int
    sha256: str
    gz_sha256: str | None = None

    @classmethod
    def of(cls, payload: bytes) -> FileSpec:
        """Spec of the given decompressed bytes (for custom or test files).

        Args:
          payload: the decompressed file content.

        Returns:
          A ``FileSpec`` with its size and SHA-256 (no ``gz_sha256``).
        """
        return cls(len(payload), hashlib.sha256(payload).hexdigest())


CHECKSUMS: dict[str, dict[str, FileSpec]] = {
    "mnist": {
        TRAIN_IMAGES: FileSpec(
            47040016,
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        TRAIN_LABELS: FileSpec(
            60008,
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        TEST_IMAGES: FileSpec(
            7840016,
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        TEST_LABELS: FileSpec(
            10008,
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    },
    "fashion-mnist": {
        TRAIN_IMAGES: FileSpec(
            47040016,
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        ),
        TRAIN_LABELS: FileSpec(
            60008,
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        ),
        TEST_IMAGES: FileSpec(
            7840016,
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        ),
        TEST_LABELS: FileSpec(
            10008,
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        ),
    },
}

MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

Array = np.ndarray


@dataclass(frozen=True)
class Splits:
    """Train/validation/test pairs ``(X, y)``: X float32 (N, 784) in [0, 1], y int32 (N,).

    Attributes:
      train: the training file's images but its last 10,000 (50,000), with their labels.
      validation: the training file's last 10,000 images and their labels.
      test: the 10,000 test images and their labels.
      source: the folder the files were read from.
    """

    train: tuple[Array, Array]
    validation: tuple[Array, Array]
    test: tuple[Array, Array]
    source: Path


# --------------------------------------------------------------------------- reading


def _check_dataset(dataset: str) -> None:
    """Reject unknown data set names early, with the list of known ones."""
    if dataset not in DATASETS:
        raise DataError(f"unknown data set {dataset!r}; known data sets: {', '.join(DATASETS)}")


def _decompress(path: Path, shown: str | None = None) -> bytes:
    """Read and decompress one gzip file; every failure becomes a DataError naming it.

    ``shown`` replaces the path in messages (a download's temp file is named by its URL).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"missing file {path}: it does not exist") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{shown or path} is not a complete gzip file ({exc}); it is truncated or "
            "corrupt: delete it and fetch it again"
        ) from exc


def _default_specs(path: Path) -> tuple[FileSpec, ...]:
    """Specs of every known data set whose file has this name (empty for unknown names)."""
    return tuple(table[path.name] for table in CHECKSUMS.values() if path.name in table)


def _verify(path: Path, payload: bytes, specs: Sequence[FileSpec]) -> None:
    """Check payload size and SHA-256 against any of ``specs`` (none: nothing to check)."""
    if not specs:
        return
    sizes = {s.size for s in specs}
    if len(payload) not in sizes:
        want = " or ".join(str(s) for s in sorted(sizes))
        raise DataError(
            f"checksum mismatch for {path}: expected {want} decompressed bytes, got "
            f"{len(payload)}; the file is truncated or is not the expected file"
        )
    got = hashlib.sha256(payload).hexdigest()
    if got not in {s.sha256 for s in specs}:
        want = " or ".join(s.sha256 for s in specs)
        raise DataError(
            f"checksum mismatch for {path}: expected payload SHA-256 {want}, got {got}; "
            "the file is corrupt or is not the expected file: delete it and fetch it again"
        )


def _header(path: Path, payload: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    """Parse and check an IDX header: big-endian magic followed by ``ndim`` dimensions."""
    need = 4 * (ndim + 1)
    if len(payload) < need:
        raise DataError(f"{path} is too short ({len(payload)} bytes) to hold an IDX header")
    fields = np.frombuffer(payload, dtype=">u4", count=ndim + 1)
    if int(fields[0]) != magic:
        raise DataError(
            f"bad magic number in {path}: expected {magic}, got {int(fields[0])}; "
            "this is not an IDX file of the expected kind (images 2051, labels 2049)"
        )
    dims = tuple(int(d) for d in fields[1:])
    expected_len = need + int(np.prod(dims, dtype=np.int64))
    if len(payload) != expected_len:
        raise DataError(
            f"{path}: header dimensions {dims} need {expected_len} bytes but the payload "
            f"has {len(payload)}; the file is truncated or malformed"
        )
    return dims


def _resolve_specs(path: Path, expected: FileSpec | None) -> tuple[FileSpec, ...]:
    """An explicit spec wins; otherwise the built-in table, looked up by file name."""
    return (expected,) if expected is not None else _default_specs(path)


def read_images(path: str | os.PathLike[str], expected: FileSpec | None = None) -> Array:
    """Read a gzip IDX image file into uint8 (N, 28, 28), checking header and checksum.

    Args:
      path: a gzip-compressed IDX image file (magic 2051).
      expected: the payload size and SHA-256 to verify against; by default the built-in
        table is used when the file has one of the standard names (either data set
        matches), and files with other names get the structural checks only.

    Returns:
      The images, uint8 ``(N, 28, 28)``, a read-only view of the decompressed bytes.

    Raises:
      DataError: the file is missing, not complete gzip, not an IDX image file of 28 x 28
        images, or fails its checksum.
    """
    path = Path(path)
    payload = _decompress(path)
    dims = _header(path, payload, IMAGE_MAGIC, 3)
    if dims[1:] != (ROWS, COLS):
        raise DataError(
            f"wrong dimensions in {path}: expected N x {ROWS} x {COLS} images, "
            f"got {' x '.join(map(str, dims))}"
        )
    _verify(path, payload, _resolve_specs(path, expected))
    return np.frombuffer(payload, dtype=np.uint8, offset=16).reshape(dims)


def read_labels(path: str | os.PathLike[str], expected: FileSpec | None = None) -> Array:
    """Read a gzip IDX label file into uint8 (N,), checking header, range and checksum.

    Args:
      path: a gzip-compressed IDX label file (magic 2049).
      expected: the payload spec to verify against, as in :func:`read_images`.

    Returns:
      The labels, uint8 ``(N,)`` in ``0..9``, a read-only view of the decompressed bytes.

    Raises:
      DataError: the file is missing, not complete gzip, not an IDX label file, holds a
        label above 9, or fails its checksum.
    """
    path = Path(path)
    payload = _decompress(path)
    (n,) = _header(path, payload, LABEL_MAGIC, 1)
    _verify(path, payload, _resolve_specs(path, expected))
    labels = np.frombuffer(payload, dtype=np.uint8, offset=8)
    if n and int(labels.max()) >= NUM_CLASSES:
        raise DataError(
            f"{path} holds label {int(labels.max())}; labels must lie in 0..{NUM_CLASSES - 1}"
        )
    return labels


# ------------------------------------------------------------------------- discovery


def cache_dir(dataset: str) -> Path:
    """The user cache folder for a data set: ``$XDG_CACHE_HOME`` or ``~/.cache``.

    Args:
      dataset: ``"mnist"`` or ``"fashion-mnist"`` (not checked here).

    Returns:
      ``<cache>/jbackprop/<dataset>``, whether or not it exists; a relative
      ``$XDG_CACHE_HOME`` is ignored, as the XDG specification says.
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "jbackprop" / dataset


def candidate_dirs(dataset: str) -> list[Path]:
    """Folders searched, in order, when no ``data_dir`` is given.

    Args:
      dataset: ``"mnist"`` or ``"fashion-mnist"``.

    Returns:
      ``$JBACKPROP_DATA/<dataset>`` (when the variable is set), :func:`cache_dir` and
      ``/usr/share/datasets/<dataset>``, whether or not they exist.

    Raises:
      DataError: an unknown data set.
    """
    _check_dataset(dataset)
    dirs = []
    env = os.environ.get(ENV_VAR, "")
    if env:
        dirs.append(Path(env).expanduser() / dataset)
    dirs += [cache_dir(dataset), SYSTEM_DIR / dataset]
    return dirs


def _complete(folder: Path) -> bool:
    """Whether a folder holds all four files of a data set."""
    return all((folder / name).is_file() for name in FILES)


def find(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Folder holding the data set's four files, without downloading; None if nowhere.

    An explicit ``data_dir`` (the folder itself, or one holding ``<dataset>/``) is the
    only place looked at: if the files are not there that is an error, not a fall-through.
    Only the files' presence is checked here; :func:`load` verifies them.

    Args:
      dataset: ``"mnist"`` or ``"fashion-mnist"``.
      data_dir: the folder to use, or None to search :func:`candidate_dirs`.

    Returns:
      The first folder holding all four files, or None when no candidate does.

    Raises:
      DataError: an unknown data set, or a ``data_dir`` without the files.
    """
    _check_dataset(dataset)
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        for candidate in (folder, folder / dataset):
            if _complete(candidate):
                return candidate
        missing = [name for name in FILES if not (folder / name).is_file()]
        raise DataError(
            f"data folder {folder} does not hold the {dataset} files "
            f"(missing: {', '.join(missing)}; nor is there a complete {folder / dataset})"
        )
    return next((d for d in candidate_dirs(dataset) if _complete(d)), None)


# -------------------------------------------------------------------------- download


class _MirrorFailure(DataError):
    """One mirror could not deliver a good file; the next one may."""


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label, self.total, self.enabled, self.shown = label, total, enabled, -1

    def update(self, done: int) -> None:
        """Redraw when the shown percentage (or megabyte, if size unknown) changes."""
        if not self.enabled:
            return
        if self.total:
            step = min(100, done * 100 // self.total)
            bar = "#" * (step * 30 // 100)
            size = f"{done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
            text = f"\r{self.label} [{bar:<30}] {step:3d}% {size}"
        else:
            step = done // 1_000_000
            text = f"\r{self.label} {done / 1e6:.1f} MB"
        if step != self.shown:
            self.shown = step
            sys.stderr.write(text)
            sys.stderr.flush()

    def close(self) -> None:
        """End the line."""
        if self.enabled and self.shown >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _disk_error(target: Path, exc: OSError) -> DataError:
    """Explain a local file-system failure while saving into ``target``."""
    if isinstance(exc, PermissionError):
        why = "permission denied: the folder is not writable"
    elif exc.errno == errno.ENOSPC:
        why = "no space left on device: the disk is full"
    else:
        why = exc.strerror or str(exc)
    return DataError(
        f"cannot save data set files in {target}: {why}; choose a writable folder with "
        f"{ENV_VAR}=DIR or pass the folder holding the files as data_dir"
    )


def _fetch_into(url: str, out: BinaryIO, label: str, progress: bool) -> None:
    """Stream ``url`` into ``out``: network failures are mirror failures, write errors not."""
    try:
        resp = urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise _MirrorFailure(f"{url}: HTTP error {exc.code} {exc.reason}") from exc
    except (OSError, HTTPException, ValueError) as exc:
        raise _MirrorFailure(f"{url}: {getattr(exc, 'reason', None) or exc}") from exc
    with resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = _Progress(label, total, progress)
        done = 0
        try:
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except (OSError, HTTPException) as exc:
                    raise _MirrorFailure(f"{url}: connection failed mid-transfer ({exc})") from exc
                if not chunk:
                    break
                out.write(chunk)  # an OSError here is local (disk full, ...), not the mirror's
                done += len(chunk)
                bar.update(done)
        finally:
            bar.close()
    if total is not None and done != total:
        raise _MirrorFailure(f"{url}: connection closed mid-transfer after {done} of {total} bytes")


def _fetch_file(url: str, final: Path, spec: FileSpec, progress: bool) -> None:
    """Download to a temp file beside ``final``, verify, then move it into place."""
    target = final.parent

    def verify(tmp: Path) -> None:
        try:
            _verify(final, _decompress(tmp, shown=url), (spec,))
        except DataError as exc:
            raise _MirrorFailure(f"{url} gave a corrupt file: {exc}") from exc

    try:
        with atomic_file(final, suffix=".part", check=verify) as out:
            _fetch_into(url, out, final.name, progress)
    except OSError as exc:
        raise _disk_error(target, exc) from exc


def download(
    dataset: str,
    target_dir: str | os.PathLike[str],
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """Download the data set's missing files into ``target_dir``; return that folder.

    Mirrors are tried in order per file (default :data:`MIRRORS`); a file that fails its
    payload checksum is reported on stderr and the next mirror is tried. Nothing is ever
    left under a final name unless it passed verification.

    Args:
      dataset: ``"mnist"`` or ``"fashion-mnist"``.
      target_dir: the folder to fill; created (with its parents) if needed.
      mirrors: base URLs to try in order, or None for :data:`MIRRORS`.
      progress: draw a progress bar on stderr.

    Returns:
      ``target_dir`` as a :class:`~pathlib.Path`.

    Raises:
      DataError: an unknown data set, no mirrors, every mirror failing for a file, or a
        folder that cannot be written (full disk, no permission).
    """
    _check_dataset(dataset)
    target = Path(target_dir).expanduser()
    bases = list(MIRRORS[dataset] if mirrors is None else mirrors)
    if not bases:
        raise DataError(f"no mirrors given to download {dataset} from")
    created = _missing_parents(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _disk_error(target, exc) from exc
    try:
        _download_files(dataset, target, bases, progress)
    except BaseException:
        # Leave no empty folders behind that a later lookup would mistake for the data set.
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    fsync_dir(target)
    return target


def _missing_parents(target: Path) -> list[Path]:
    """``target`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (target, *target.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _download_files(dataset: str, target: Path, bases: list[str], progress: bool) -> None:
    for name in FILES:
        final = target / name
        if final.is_file():
            continue
        failures = []
        for i, base in enumerate(bases):
            url = base.rstrip("/") + "/" + name
            try:
                _fetch_file(url, final, CHECKSUMS[dataset][name], progress)
                break
            except _MirrorFailure as exc:
                failures.append(str(exc))
                if i + 1 < len(bases):
                    print(f"jbackprop: {exc}; trying the next mirror", file=sys.stderr)
        else:
            raise DataError(f"could not download {name}: " + "; ".join(failures))


# ---------------------------------------------------------------------------- loading


def _not_found(dataset: str, reason: str) -> DataError:
    """The one-paragraph "looked in" message for a data set that is nowhere."""
    looked = ", ".join(str(d) for d in candidate_dirs(dataset))
    return DataError(
        f"could not find {dataset}: looked in {looked}; provide it by (1) --data-dir DIR, "
        f"(2) {ENV_VAR}=DIR holding {dataset}/, (3) placing the files in "
        f"{cache_dir(dataset)}; {reason}"
    )


def _locate(
    dataset: str,
    data_dir: str | os.PathLike[str] | None,
    download_ok: bool,
    progress: bool,
    mirrors: Sequence[str] | None,
) -> Path:
    """Find the data set on disk or, if allowed, download it into the user cache."""
    found = find(dataset, data_dir)
    if found is not None:
        return found
    if not download_ok:
        raise _not_found(dataset, "downloading was turned off")
    try:
        return download(dataset, cache_dir(dataset), mirrors=mirrors, progress=progress)
    except DataError as exc:
        raise _not_found(dataset, f"downloading failed: {exc}") from exc


def _features(images: Array) -> Array:
    """uint8 (N, 28, 28) -> float32 (N, 784) scaled to [0, 1]."""
    x = images.reshape(len(images), ROWS * COLS).astype(np.float32)
    x /= 255.0
    return x


def _pair(folder: Path, dataset: str, images: str, labels: str) -> tuple[Array, Array]:
    """Read and verify one images/labels pair and check that their counts agree."""
    table = CHECKSUMS[dataset]
    x = read_images(folder / images, table[images])
    y = read_labels(folder / labels, table[labels])
    if len(x) != len(y):
        raise DataError(
            f"{folder / images} holds {len(x)} images but {folder / labels} holds "
            f"{len(y)} labels; the counts must agree"
        )
    return _features(x), y.astype(np.int32)


def load(
    dataset: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
    mirrors: Sequence[str] | None = None,
) -> Splits:
    """Load a verified data set split as in Nielsen's book (train / validation / test).

    The training file is split into its first N - 10,000 examples (training) and its
    last 10,000 (validation); the t10k files give the test set.

    Args:
      dataset: ``"mnist"`` or ``"fashion-mnist"``.
      data_dir: the folder holding the files (or a ``<dataset>/`` folder); None searches
        :func:`candidate_dirs` and then downloads into :func:`cache_dir`.
      download: whether a missing data set may be downloaded.
      progress: draw a progress bar on stderr while downloading.
      mirrors: base URLs for the download, or None for :data:`MIRRORS`.

    Returns:
      :class:`Splits` with ``X`` float32 ``(N, 784)`` in ``[0, 1]`` and ``y`` int32
      ``(N,)``: 50,000 training, 10,000 validation and 10,000 test examples.

    Raises:
      DataError: the data set cannot be found or fetched (the message says where it
        looked and how to provide the files), or a file fails verification.
    """
    _check_dataset(dataset)
    folder = _locate(dataset, data_dir, download, progress, mirrors)
    x, y = _pair(folder, dataset, TRAIN_IMAGES, TRAIN_LABELS)
    n_train = len(x) - VALIDATION_SIZE
    if n_train <= 0:
        raise DataError(
            f"{folder / TRAIN_IMAGES} holds {len(x)} images, too few to hold out "
            f"{VALIDATION_SIZE} for validation"
        )
    return Splits(
        train=(x[:n_train], y[:n_train]),
        validation=(x[n_train:], y[n_train:]),
        test=_pair(folder, dataset, TEST_IMAGES, TEST_LABELS),
        source=folder,
    )
