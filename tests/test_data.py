"""Tests for jbackprop.data: IDX readers, checksums, discovery, download, loading.

No test touches the network: downloads are served by a local ``http.server`` on 127.0.0.1.
"""

from __future__ import annotations

import errno
import gzip
import http.server
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jbackprop import data

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------- tiny IDX fixtures


def image_payload(n: int = 7, rows: int = 28, cols: int = 28, magic: int = 2051, seed: int = 0):
    """Raw IDX image bytes with random pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (n, rows, cols), dtype=np.uint8)
    return struct.pack(">IIII", magic, n, rows, cols) + pixels.tobytes()


def label_payload(n: int = 7, magic: int = 2049, seed: int = 0) -> bytes:
    """Raw IDX label bytes with labels 0..9."""
    labels = np.random.default_rng(seed).integers(0, 10, n, dtype=np.uint8)
    return struct.pack(">II", magic, n) + labels.tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    """Write ``payload`` gzip-compressed to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, compresslevel=1))
    return path


def fake_dataset(n_train: int = 12, n_test: int = 5) -> dict[str, bytes]:
    """Payloads of a tiny complete data set, keyed by the standard file names."""
    return {
        data.TRAIN_IMAGES: image_payload(n_train, seed=1),
        data.TRAIN_LABELS: label_payload(n_train, seed=1),
        data.TEST_IMAGES: image_payload(n_test, seed=2),
        data.TEST_LABELS: label_payload(n_test, seed=2),
    }


def write_dataset(folder: Path, payloads: dict[str, bytes]) -> Path:
    """Write all files of a data set into ``folder``."""
    for name, payload in payloads.items():
        write_gz(folder / name, payload)
    return folder


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """A tiny data set whose checksums replace the real MNIST table for the test."""
    payloads = fake_dataset()
    table = {name: data.FileSpec.of(p) for name, p in payloads.items()}
    monkeypatch.setitem(data.CHECKSUMS, "mnist", table)
    monkeypatch.setattr(data, "VALIDATION_SIZE", 4)
    return payloads


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolate discovery from the real machine: fresh HOME, no env overrides, no system dir."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("JBACKPROP_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    return tmp_path / "home"


# ------------------------------------------------------------------- fake mirrors


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, bytes]], str]]:
    """Start local HTTP servers; ``serve({name: body})`` returns the base URL."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(files: dict[str, bytes], short: frozenset[str] = frozenset()) -> str:
        """Serve ``files``; those named in ``short`` claim more bytes than they send."""

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                body = files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + 1000 * (name in short)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/files/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def gz_files(payloads: dict[str, bytes]) -> dict[str, bytes]:
    """Compress payloads for serving."""
    return {name: gzip.compress(p, compresslevel=1) for name, p in payloads.items()}


# ------------------------------------------------------------------------ readers


def test_round_trip(tmp_path: Path) -> None:
    images, labels = image_payload(), label_payload()
    x = data.read_images(write_gz(tmp_path / "i.gz", images), data.FileSpec.of(images))
    y = data.read_labels(write_gz(tmp_path / "l.gz", labels), data.FileSpec.of(labels))
    assert x.dtype == np.uint8 and x.shape == (7, 28, 28)
    assert y.dtype == np.uint8 and y.shape == (7,)
    assert x.tobytes() == images[16:] and y.tobytes() == labels[8:]


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 20), st.integers(0, 2**32 - 1))
def test_round_trip_property(tmp_path_factory: pytest.TempPathFactory, n: int, seed: int) -> None:
    folder = tmp_path_factory.mktemp("rt")
    images, labels = image_payload(n, seed=seed), label_payload(n, seed=seed)
    x = data.read_images(write_gz(folder / "i.gz", images))
    y = data.read_labels(write_gz(folder / "l.gz", labels))
    assert x.shape == (n, 28, 28) and y.shape == (n,)
    np.testing.assert_array_equal(x.reshape(-1), np.frombuffer(images, np.uint8, offset=16))
    np.testing.assert_array_equal(y, np.frombuffer(labels, np.uint8, offset=8))


@pytest.mark.parametrize(
    ("reader", "payload"),
    [(data.read_images, image_payload(magic=2049)), (data.read_labels, label_payload(magic=2051))],
)
def test_bad_magic(tmp_path: Path, reader: Callable, payload: bytes) -> None:
    path = write_gz(tmp_path / "f.gz", payload)
    with pytest.raises(data.DataError, match=r"bad magic.*f\.gz.*expected"):
        reader(path)


def test_wrong_dimensions(tmp_path: Path) -> None:
    path = write_gz(tmp_path / "f.gz", image_payload(rows=28, cols=27))
    with pytest.raises(data.DataError, match=r"wrong dimensions in .*f\.gz.*7 x 28 x 27"):
        data.read_images(path)


def test_payload_shorter_than_header_says(tmp_path: Path) -> None:
    path = write_gz(tmp_path / "f.gz", image_payload()[:-100])
    with pytest.raises(data.DataError, match=r"f\.gz.*truncated"):
        data.read_images(path)
    path = write_gz(tmp_path / "h.gz", b"\0\0\x08")
    with pytest.raises(data.DataError, match="too short"):
        data.read_labels(path)


def test_label_out_of_range(tmp_path: Path) -> None:
    path = write_gz(tmp_path / "l.gz", struct.pack(">II", 2049, 2) + bytes([3, 10]))
    with pytest.raises(data.DataError, match=r"label 10"):
        data.read_labels(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(image_payload())[:-40])
    with pytest.raises(data.DataError, match=r"f\.gz is not a complete gzip file"):
        data.read_images(path)


def test_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "f.gz"
    path.write_bytes(image_payload())
    with pytest.raises(data.DataError, match=r"not a complete gzip file"):
        data.read_images(path)


def test_checksum_mismatch(tmp_path: Path) -> None:
    payload = image_payload()
    path = write_gz(tmp_path / "f.gz", payload)
    good = data.FileSpec.of(payload)
    wrong_hash = data.FileSpec(good.size, "0" * 64)
    with pytest.raises(data.DataError, match=rf"checksum mismatch.*expected.*{'0' * 64}.*got"):
        data.read_images(path, wrong_hash)
    wrong_size = data.FileSpec(good.size + 1, good.sha256)
    with pytest.raises(data.DataError, match=rf"expected {good.size + 1} .*got {good.size}"):
        data.read_images(path, wrong_size)


def test_standard_names_are_verified_by_default(tmp_path: Path) -> None:
    """A file with a standard name is checked against the real table unless told otherwise."""
    payload = label_payload()
    path = write_gz(tmp_path / data.TRAIN_LABELS, payload)
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.read_labels(path)
    assert len(data.read_labels(path, data.FileSpec.of(payload))) == 7


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match=r"missing file .*nope\.gz"):
        data.read_images(tmp_path / "nope.gz")


def test_checksum_table_is_complete() -> None:
    assert set(data.CHECKSUMS) == set(data.DATASETS) == set(data.MIRRORS)
    for table in data.CHECKSUMS.values():
        assert set(table) == set(data.FILES)
        assert all(len(s.sha256) == 64 for s in table.values())


# ---------------------------------------------------------------------- discovery


def test_discovery_order(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payloads = fake_dataset()
    assert data.find("mnist") is None

    system = write_dataset(tmp_path / "system" / "mnist", payloads)
    assert data.find("mnist") == system

    cache = write_dataset(home / ".cache" / "jbackprop" / "mnist", payloads)
    assert data.find("mnist") == cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.find("mnist") == system  # the ~/.cache copy is no longer the cache
    xdg = write_dataset(tmp_path / "xdg" / "jbackprop" / "mnist", payloads)
    assert data.find("mnist") == xdg

    monkeypatch.setenv("JBACKPROP_DATA", str(tmp_path / "env"))
    assert data.find("mnist") == xdg  # env folder without the files is skipped
    env = write_dataset(tmp_path / "env" / "mnist", payloads)
    assert data.find("mnist") == env

    explicit = write_dataset(tmp_path / "explicit", payloads)
    assert data.find("mnist", explicit) == explicit
    assert data.find("mnist", tmp_path / "env") == env  # a folder holding mnist/ works too
    assert data.candidate_dirs("mnist") == [env, xdg, system]


def test_partial_folder_is_skipped(tmp_path: Path, home: Path) -> None:
    cache = data.cache_dir("mnist")
    write_gz(cache / data.TRAIN_IMAGES, image_payload())
    assert cache == home / ".cache" / "jbackprop" / "mnist"
    assert data.find("mnist") is None


def test_explicit_data_dir_does_not_fall_through(tmp_path: Path, home: Path) -> None:
    write_dataset(data.cache_dir("mnist"), fake_dataset())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match=rf"data folder {empty} does not hold"):
        data.find("mnist", empty)
    with pytest.raises(data.DataError, match=rf"{empty}"):
        data.load("mnist", data_dir=empty)


def test_unknown_dataset() -> None:
    with pytest.raises(data.DataError, match=r"unknown data set 'cifar'.*mnist"):
        data.find("cifar")


# ------------------------------------------------------------------------ loading


def test_load_splits(tmp_path: Path, tiny: dict[str, bytes]) -> None:
    folder = write_dataset(tmp_path / "d", tiny)
    ds = data.load("mnist", data_dir=folder, download=False)
    assert ds.source == folder
    (xt, yt), (xv, yv), (xs, ys) = ds.train, ds.validation, ds.test
    assert xt.shape == (8, 784) and xv.shape == (4, 784) and xs.shape == (5, 784)
    assert yt.shape == (8,) and yv.shape == (4,) and ys.shape == (5,)
    assert {a.dtype for a in (xt, xv, xs)} == {np.dtype(np.float32)}
    assert {a.dtype for a in (yt, yv, ys)} == {np.dtype(np.int32)}
    assert all(isinstance(a, np.ndarray) for a in (xt, yt, xv, yv, xs, ys))
    pixels = np.frombuffer(tiny[data.TRAIN_IMAGES], np.uint8, offset=16).reshape(12, 784)
    np.testing.assert_array_equal(np.concatenate([xt, xv]), pixels / np.float32(255))
    np.testing.assert_array_equal(yv, np.frombuffer(tiny[data.TRAIN_LABELS], np.uint8)[8 + 8 :])


def test_load_count_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payloads = fake_dataset()
    payloads[data.TEST_LABELS] = label_payload(4)
    monkeypatch.setitem(
        data.CHECKSUMS, "mnist", {n: data.FileSpec.of(p) for n, p in payloads.items()}
    )
    monkeypatch.setattr(data, "VALIDATION_SIZE", 4)
    folder = write_dataset(tmp_path / "d", payloads)
    with pytest.raises(data.DataError, match=r"5 images but .* 4 labels"):
        data.load("mnist", data_dir=folder)


def test_load_download_off(home: Path) -> None:
    with pytest.raises(data.DataError, match=r"could not find mnist: looked in .*turned off"):
        data.load("mnist", download=False)


def test_load_real_mnist() -> None:
    folder = REAL_DATA / "mnist"
    if not folder.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"real MNIST expected at {folder} on CI but the folder is absent")
        pytest.skip(f"real MNIST not found at {folder}")
    ds = data.load("mnist", data_dir=folder, download=False)
    assert ds.source == folder
    for (x, y), n in zip((ds.train, ds.validation, ds.test), (50000, 10000, 10000), strict=True):
        assert x.shape == (n, 784) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int32
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0
        assert set(np.unique(y)) == set(range(10))


# ----------------------------------------------------------------------- download


def test_download_into_cache(
    home: Path, tiny: dict[str, bytes], serve: Callable, capsys: pytest.CaptureFixture
) -> None:
    url = serve(gz_files(tiny))
    ds = data.load("mnist", mirrors=[url])
    assert ds.source == data.cache_dir("mnist") == home / ".cache" / "jbackprop" / "mnist"
    assert sorted(p.name for p in ds.source.iterdir()) == sorted(data.FILES)
    assert "100%" in capsys.readouterr().err
    assert data.load("mnist", mirrors=[closed_port_url()]).source == ds.source  # now on disk


def test_download_quiet(tmp_path: Path, tiny: dict[str, bytes], serve: Callable, capsys) -> None:
    url = serve(gz_files(tiny))
    assert data.download("mnist", tmp_path / "t", mirrors=[url], progress=False) == tmp_path / "t"
    assert capsys.readouterr().err == ""


def test_download_recompressed_copy_passes(
    tmp_path: Path, tiny: dict[str, bytes], serve: Callable
) -> None:
    """Only the payload is checked, so a differently compressed copy is fine."""
    files = {n: gzip.compress(p, compresslevel=9, mtime=12345) for n, p in tiny.items()}
    data.download("mnist", tmp_path, mirrors=[serve(files)], progress=False)
    assert data.find("mnist", tmp_path) == tmp_path


def test_corrupt_first_mirror_then_good(
    tmp_path: Path, tiny: dict[str, bytes], serve: Callable, capsys: pytest.CaptureFixture
) -> None:
    bad = gz_files(tiny)
    bad[data.TRAIN_IMAGES] = gzip.compress(image_payload(12, seed=99))  # valid gzip, wrong data
    bad[data.TEST_LABELS] = bad[data.TEST_LABELS][:-10]  # truncated
    del bad[data.TEST_IMAGES]  # 404
    mirrors = [serve(bad, frozenset({data.TRAIN_LABELS})), serve(gz_files(tiny))]
    data.download("mnist", tmp_path, mirrors=mirrors, progress=False)
    err = capsys.readouterr().err
    assert "gave a corrupt file" in err and "checksum mismatch" in err and "next mirror" in err
    assert "404" in err and "mid-transfer" in err
    for name, payload in tiny.items():
        assert gzip.decompress((tmp_path / name).read_bytes()) == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(data.FILES)


def test_corrupt_only_mirror(tmp_path: Path, tiny: dict[str, bytes], serve: Callable) -> None:
    bad = gz_files(tiny)
    bad[data.TRAIN_IMAGES] = gzip.compress(image_payload(12, seed=99))
    with pytest.raises(data.DataError, match=r"could not download train-images.*checksum"):
        data.download("mnist", tmp_path, mirrors=[serve(bad)], progress=False)
    assert list(tmp_path.iterdir()) == []  # no final file, no temp file


def test_offline(home: Path, tiny: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JBACKPROP_DATA", str(home / "env"))
    with pytest.raises(data.DataError) as info:
        data.load("mnist", mirrors=[closed_port_url()], progress=False)
    msg = str(info.value)
    cache = data.cache_dir("mnist")
    assert msg.startswith(f"could not find mnist: looked in {home / 'env' / 'mnist'}, {cache}")
    assert "(1) --data-dir DIR, (2) JBACKPROP_DATA=DIR holding mnist/" in msg
    assert f"(3) placing the files in {cache}" in msg
    assert "refused" in msg.lower()
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_unwritable_cache(
    tmp_path: Path, tiny: dict[str, bytes], serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(data.DataError, match=rf"cannot save .* in {tmp_path}: permission denied"):
        data.download("mnist", tmp_path, mirrors=[serve(gz_files(tiny))], progress=False)


def test_full_disk(
    tmp_path: Path, tiny: dict[str, bytes], serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.os, "fsync", full)
    with pytest.raises(data.DataError, match="no space left on device: the disk is full"):
        data.download("mnist", tmp_path, mirrors=[serve(gz_files(tiny))], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_download_leaves_no_empty_folder(
    tmp_path: Path, tiny: dict[str, bytes], serve: Callable
) -> None:
    base = serve({})  # every file is missing on the mirror
    target = tmp_path / "cache" / "jbackprop" / "mnist"
    with pytest.raises(data.DataError, match="could not download"):
        data.download("mnist", target, mirrors=[base], progress=False)
    assert not (tmp_path / "cache").exists()
