"""learnbench.datasets: shapes, ranges and splits of the four datasets against published figures, and the IDX
machinery (root search, verification, download) against bad files and a local HTTP mirror. No internet.

MNIST and Fashion-MNIST come from `$LEARNBENCH_DATA` (CI: ../shared/datasets); their tests skip when it is absent.
"""

from __future__ import annotations

import collections
import functools
import gzip
import http.server
import os
import pickle
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from learnbench import datasets as D
from learnbench.datasets import idx
from learnbench.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LEARNBENCH_DATA") or REPO.parent / "shared" / "datasets").resolve()
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _needs(dataset: str):
    missing = [f for f in FILES if not (SHARED / dataset / f"{f}.gz").is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"{dataset} IDX files not in {SHARED} (set LEARNBENCH_DATA to "
                                                    f"a folder holding {dataset}/*-ubyte.gz)")


needs_mnist, needs_fashion = _needs("mnist"), _needs("fashion-mnist")


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No root but the ones a test makes: HOME, the system root, $LEARNBENCH_DATA and the mirror all point into
    tmp_path (or nowhere)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(idx, "SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.delenv("LEARNBENCH_DATA", raising=False)
    monkeypatch.delenv("LEARNBENCH_MIRROR", raising=False)
    return tmp_path


def _reference_idx(path: Path) -> np.ndarray:
    """An independent IDX reader (struct + gzip) to check ours against."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim:], np.uint8).reshape(dims).copy()


@functools.lru_cache(maxsize=None)
def _shared_splits(dataset: str) -> D.Splits:
    return D.load(dataset, data_dir=str(SHARED))


def _link_dataset(root: Path, dataset: str, files=FILES) -> Path:
    """`root/dataset/` holding symlinks to the shared .gz files; returns the folder."""
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / f"{name}.gz").symlink_to(SHARED / dataset / f"{name}.gz")
    return folder


def _check_splits(s: D.Splits, name: str) -> None:
    info = D.info(name)
    assert (s.name, s.input_shape, s.n_classes) == (name, info.input_shape, info.n_classes)
    for split, n in (("train", info.n_train), ("val", info.n_val), ("test", info.n_test)):
        x, y = getattr(s, f"{split}_x"), getattr(s, f"{split}_y")
        assert x.shape == (n, *info.input_shape) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert y.shape == (n,) and y.dtype == torch.int64
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert set(y.tolist()) == set(range(info.n_classes)), f"{name} {split} lacks a class"


def _rows(x: torch.Tensor, scale: float) -> collections.Counter:
    """Multiset of the examples, as exact integer pixel bytes."""
    ints = torch.round(x * scale).to(torch.uint8).reshape(len(x), -1).numpy()
    return collections.Counter(map(bytes, ints))


# ---- registry -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_info_is_cheap_and_unknown_names_list_the_known_ones():
    code = ("import sys; from learnbench import datasets as D; infos = [D.info(n) for n in D.NAMES]; "
            "heavy = [m for m in ('sklearn', 'mnist1d', 'matplotlib') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"info() imported {out.strip()}"
    assert [D.info(n).needs_files for n in D.NAMES] == [False, False, True, True]
    with pytest.raises(UsageError, match=r"unknown dataset 'cifar10' \(known: digits, mnist1d, mnist, fashion-mnist\)"):
        D.info("cifar10")
    for call in (D.prepare, D.load):
        with pytest.raises(UsageError, match="unknown dataset"):
            call("cifar10")


def test_carve_validation_is_a_seeded_partition():
    train, val = D.carve_validation(1000, 100)
    assert len(val) == 100 and len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    again = D.carve_validation(1000, 100)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, D.carve_validation(1000, 100, seed=1)[1])


def test_splits_to_moves_every_tensor():
    s = D.load("digits").to("meta")
    tensors = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    assert all(getattr(s, f).device.type == "meta" for f in tensors)
    assert (s.name, s.input_shape, s.n_classes) == ("digits", (1, 8, 8), 10)


# ---- the generated and embedded datasets --------------------------------------------------------------------------


def test_digits_is_sklearn_digits_split_20_10_stratified():
    from sklearn.datasets import load_digits

    s = D.load("digits")
    _check_splits(s, "digits")
    bunch = load_digits()
    everything = torch.cat([s.train_x, s.val_x, s.test_x])
    assert _rows(everything, 16) == _rows(torch.from_numpy(bunch.images / 16.0), 16)  # all 1,797, each once
    per_class = np.bincount(bunch.target)
    test_counts = torch.bincount(s.test_y, minlength=10).numpy()
    assert np.all(np.abs(test_counts - 0.2 * per_class) <= 1)  # stratified
    again = D.load("digits")
    assert torch.equal(s.val_x, again.val_x) and torch.equal(s.test_y, again.test_y)


def test_mnist1d_is_the_published_generator_offline_and_leaves_global_rngs_alone(monkeypatch):
    from learnbench.datasets import mnist1d

    def forbidden(*args, **kwargs):
        raise AssertionError("MNIST-1D generation touched the network or pickle")

    for target, attr in ((socket.socket, "connect"), (socket, "create_connection"), (pickle, "load"),
                         (pickle, "loads")):
        monkeypatch.setattr(target, attr, forbidden)
    mnist1d.generate.cache_clear()
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    s = D.load("mnist1d")
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    _check_splits(s, "mnist1d")
    # The paper's 4,000 / 1,000 split of 5,000 signals, 500 per class (the generator's samples_per_class).
    assert len(s.train_y) + len(s.val_y) == 4000
    assert torch.bincount(torch.cat([s.train_y, s.val_y, s.test_y])).tolist() == [500] * 10
    assert s.train_x.min() == 0.0 and s.train_x.max() == 1.0  # scaled by the train split's own range
    assert not set(map(bytes, s.train_x.numpy())) & set(map(bytes, s.val_x.numpy()))
    # Regression pin: what seed 42 gives with mnist1d 0.0.1.post1 / 0.0.2.post1 (identical generator code).
    assert s.test_y[:10].tolist() == [2, 6, 3, 9, 4, 3, 1, 9, 5, 2]
    again = D.load("mnist1d")
    assert torch.equal(s.train_x, again.train_x) and torch.equal(s.val_y, again.val_y)


def test_mnist1d_without_its_package_is_a_usage_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist1d" else real(name, *a))
    with pytest.raises(UsageError, match=r"dataset 'mnist1d' needs the mnist1d package"):
        D.prepare("mnist1d")


# ---- MNIST and Fashion-MNIST from the shared files ----------------------------------------------------------------

# Published per-pixel statistics of the 60,000 training images in [0, 1] (MNIST: the 0.1307 / 0.3081 of the
# PyTorch examples; Fashion-MNIST: 0.2860 / 0.3530) and the per-class test counts.
PUBLISHED = {
    "mnist": (0.1307, 0.3081, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
    "fashion-mnist": (0.2860, 0.3530, [1000] * 10),
}


@pytest.mark.parametrize("name", [pytest.param("mnist", marks=needs_mnist),
                                  pytest.param("fashion-mnist", marks=needs_fashion)])
@pytest.mark.slow
def test_idx_datasets_match_the_files_and_published_figures(name):
    s = _shared_splits(name)
    _check_splits(s, name)
    mean, std, test_counts = PUBLISHED[name]
    got_std, got_mean = torch.std_mean(torch.cat([s.train_x, s.val_x]))
    assert abs(got_mean.item() - mean) < 1e-4 and abs(got_std.item() - std) < 1e-4
    assert torch.bincount(s.test_y).tolist() == test_counts
    raw = {f: _reference_idx(SHARED / name / f"{f}.gz") for f in FILES}
    assert torch.equal(s.test_x, torch.from_numpy(raw["t10k-images-idx3-ubyte"][:, None] / np.float32(255)))
    assert torch.equal(s.test_y, torch.from_numpy(raw["t10k-labels-idx1-ubyte"].astype(np.int64)))
    # train + val is exactly the official training set, each image once: the split loses and duplicates nothing
    assert _rows(s.train_x, 255) + _rows(s.val_x, 255) == _rows(torch.from_numpy(raw["train-images-idx3-ubyte"]), 1)
    assert D.load(name, data_dir=str(SHARED)).val_y.equal(s.val_y)  # same seed, same split


@needs_mnist
def test_plain_idx_files_load_like_gzipped_ones(isolated):
    folder = isolated / "plain" / "mnist"
    folder.mkdir(parents=True)
    for f in FILES:
        (folder / f).write_bytes(gzip.decompress((SHARED / "mnist" / f"{f}.gz").read_bytes()))
        assert np.array_equal(idx.read_idx(folder / f), idx.read_idx(SHARED / "mnist" / f"{f}.gz"))
    plain, gz = D.load("mnist", data_dir=str(isolated / "plain")), _shared_splits("mnist")
    assert all(torch.equal(getattr(plain, k), getattr(gz, k)) for k in ("train_x", "val_y", "test_x", "test_y"))


@needs_mnist
def test_prepare_is_cheap_once_verified_and_rechecks_a_changed_file(isolated, monkeypatch):
    folder = isolated / "root" / "mnist"
    folder.mkdir(parents=True)
    for f in FILES:
        shutil.copy(SHARED / "mnist" / f"{f}.gz", folder)
    D.prepare("mnist", str(isolated / "root"))
    checks = []
    monkeypatch.setattr(idx, "_check", lambda data, spec: checks.append(spec.name) or idx.parse_idx(data))
    D.prepare("mnist", str(isolated / "root"))
    assert checks == []
    os.utime(folder / "t10k-labels-idx1-ubyte.gz", ns=(0, 0))
    D.prepare("mnist", str(isolated / "root"))
    assert checks == ["t10k-labels-idx1-ubyte"]


# ---- bad files ----------------------------------------------------------------------------------------------------

LABELS = "t10k-labels-idx1-ubyte"  # the smallest file (10 kB) plays the bad one


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _bad_files() -> dict:
    def gz_bytes():
        return (SHARED / "mnist" / f"{LABELS}.gz").read_bytes()

    return {  # case -> (file name to write, its bytes, expected message)
        "flipped label": (LABELS, lambda: _flip(gzip.decompress(gz_bytes()), 100), r"SHA-256 mismatch"),
        "flipped gzip bytes": (f"{LABELS}.gz", lambda: _flip(gz_bytes(), 2000), r"is corrupt \(gzip: "),
        "truncated gzip": (f"{LABELS}.gz", lambda: gz_bytes()[:2000], r"is truncated \(gzip stream ended early\)"),
        "truncated idx": (LABELS, lambda: gzip.decompress(gz_bytes())[:5000], r"is truncated \(5,000 bytes where"),
        "wrong magic": (LABELS, lambda: b"\x1f\x8b\x08\x00" + gzip.decompress(gz_bytes())[4:], r"not an IDX file"),
    }


@needs_mnist
@pytest.mark.parametrize("case", list(_bad_files()))
def test_a_bad_file_is_one_usage_error_naming_it(isolated, case):
    name, make, message = _bad_files()[case]
    folder = _link_dataset(isolated / "root", "mnist", [f for f in FILES if f != LABELS])
    (folder / name).write_bytes(make())
    for call in (D.prepare, D.load):
        with pytest.raises(UsageError, match=message) as err:
            call("mnist", str(isolated / "root"))
        text = str(err.value)
        assert text.startswith("dataset 'mnist': ") and str(folder / name) in text and "\n" not in text


@needs_mnist
def test_a_missing_file_with_no_reachable_mirror_names_file_roots_and_url(isolated, monkeypatch):
    folder = _link_dataset(isolated / "root", "mnist", [f for f in FILES if f != LABELS])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LEARNBENCH_MIRROR", f"http://127.0.0.1:{port}")
    with pytest.raises(UsageError) as err:
        D.prepare("mnist", str(isolated / "root"))
    text = str(err.value)
    assert text.startswith(f"dataset 'mnist': {LABELS}[.gz] not found in {isolated / 'root'}, ~/.cache/learnbench, "
                           f"{isolated / 'system'} and download from http://127.0.0.1:{port}/mnist/{LABELS}.gz "
                           "failed: ")
    assert "refused" in text and "\n" not in text
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{f}.gz" for f in FILES if f != LABELS)
    with pytest.raises(UsageError, match="train-images-idx3-ubyte.gz failed: .*refused"):
        D.load("mnist", str(isolated / "new" / "root"))
    assert not (isolated / "new").exists()  # the folders made for the download are gone again


# ---- downloading from a local mirror ------------------------------------------------------------------------------


class _Mirror:
    """A static HTTP server on 127.0.0.1 over `folder`, counting requests."""

    def __init__(self, folder: Path):
        self.paths: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_request(self, *args):
                mirror.paths.append(self.path)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(isolated, monkeypatch):
    (isolated / "mirror").mkdir()
    server = _Mirror(isolated / "mirror")
    monkeypatch.setenv("LEARNBENCH_MIRROR", server.url)
    yield server
    server.close()


@needs_mnist
def test_download_from_a_mirror_verifies_and_renames_atomically(isolated, mirror, capfd):
    shutil.copytree(SHARED / "mnist", isolated / "mirror" / "mnist")  # serve a copy of the shared files
    root = isolated / "downloads"  # does not exist yet: the download makes it
    D.prepare("mnist", str(root))
    assert sorted(mirror.paths) == sorted(f"/mnist/{f}.gz" for f in FILES)
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(f"{f}.gz" for f in FILES)  # no temp left
    assert not (isolated / "home").exists()  # went to the first writable root, not the cache
    for f in FILES:
        assert (root / "mnist" / f"{f}.gz").read_bytes() == (SHARED / "mnist" / f"{f}.gz").read_bytes()
    assert "mnist/train-images-idx3-ubyte.gz" in capfd.readouterr().err  # the progress bar
    got, want = D.load("mnist", str(root)), _shared_splits("mnist")
    assert all(torch.equal(getattr(got, k), getattr(want, k)) for k in ("train_x", "val_y", "test_x", "test_y"))
    D.prepare("mnist", str(root))
    assert len(mirror.paths) == 4  # found on disk now: nothing fetched again


@needs_mnist
@pytest.mark.parametrize("case, message", [("flipped label", "SHA-256 mismatch"),
                                           ("truncated gzip", r"truncated \(gzip stream ended early\)"),
                                           ("absent", "HTTP 404")])
def test_a_bad_download_is_an_error_and_leaves_nothing_behind(isolated, mirror, case, message):
    (isolated / "mirror" / "mnist").mkdir()
    good = (SHARED / "mnist" / f"{LABELS}.gz").read_bytes()
    served = {"flipped label": gzip.compress(_flip(gzip.decompress(good), 100)), "truncated gzip": good[:2000]}
    if case in served:
        (isolated / "mirror" / "mnist" / f"{LABELS}.gz").write_bytes(served[case])
    folder = _link_dataset(isolated / "root", "mnist", [f for f in FILES if f != LABELS])
    with pytest.raises(UsageError, match=message) as err:
        D.prepare("mnist", str(isolated / "root"))
    assert f"download from {mirror.url}/mnist/{LABELS}.gz failed" in str(err.value)
    assert mirror.paths == [f"/mnist/{LABELS}.gz"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{f}.gz" for f in FILES if f != LABELS)


# ---- where files are found ----------------------------------------------------------------------------------------


@needs_mnist
def test_roots_are_searched_in_order(isolated, monkeypatch):
    roots = {"arg": isolated / "arg", "env": isolated / "env", "cache": isolated / "home" / ".cache" / "learnbench",
             "system": isolated / "system"}
    monkeypatch.setenv("LEARNBENCH_DATA", str(roots["env"]))
    assert idx.search_roots(roots["arg"]) == list(roots.values())
    assert idx.search_roots(None) == list(roots.values())[1:]
    for root in roots.values():
        _link_dataset(root, "mnist", [LABELS])
    for key, root in roots.items():
        assert idx.locate("mnist", LABELS, roots["arg"]) == root / "mnist" / f"{LABELS}.gz", key
        (root / "mnist" / f"{LABELS}.gz").unlink()
    assert idx.locate("mnist", LABELS, roots["arg"]) is None
    (roots["system"] / "mnist" / LABELS).write_bytes(b"")
    _link_dataset(roots["system"], "mnist", [LABELS])
    assert idx.locate("mnist", LABELS) == roots["system"] / "mnist" / LABELS  # uncompressed wins within a folder


@needs_mnist
def test_downloads_go_to_the_first_writable_root(isolated, mirror, monkeypatch):
    (isolated / "mirror" / "mnist").mkdir()
    shutil.copy(SHARED / "mnist" / f"{LABELS}.gz", isolated / "mirror" / "mnist")
    (isolated / "a-file").write_text("")
    monkeypatch.setenv("LEARNBENCH_DATA", str(isolated / "env"))
    _link_dataset(isolated / "system", "mnist", [f for f in FILES if f != LABELS])
    D.prepare("mnist", str(isolated / "a-file" / "sub"))  # data_dir cannot be created: skipped
    downloaded = isolated / "env" / "mnist" / f"{LABELS}.gz"
    assert downloaded.read_bytes() == (SHARED / "mnist" / f"{LABELS}.gz").read_bytes()


@needs_fashion
def test_debian_dataset_fashion_mnist_layout(isolated):
    # Debian's dataset-fashion-mnist installs /usr/share/datasets/fashion-mnist/{train,t10k}-*-ubyte.gz, recompressed
    # (its .gz MD5s differ from torchvision's; the decompressed content is the canonical one). The shared files are
    # byte-identical to that package's (MD5 cf8536b0... for train-images), so this is the layout and the bytes.
    _link_dataset(isolated / "system", "fashion-mnist")
    D.prepare("fashion-mnist")
    s, want = D.load("fashion-mnist"), _shared_splits("fashion-mnist")
    assert torch.equal(s.train_x, want.train_x) and torch.equal(s.test_y, want.test_y)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed here")
def test_the_installed_debian_package_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # nothing in the cache: the system root must serve the files
    monkeypatch.delenv("LEARNBENCH_DATA", raising=False)
    monkeypatch.setenv("LEARNBENCH_MIRROR", "http://127.0.0.1:9")  # and no download may happen
    assert idx.locate("fashion-mnist", "train-images-idx3-ubyte").parent == Path("/usr/share/datasets/fashion-mnist")
    _check_splits(D.load("fashion-mnist"), "fashion-mnist")
