"""IDX files (the MNIST family's format): finding them, downloading them, verifying them, reading them.

Format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code (0x08 = unsigned byte), the
number of dimensions, then each dimension as a big-endian uint32, then the data in C order. Files may be gzipped
(`<name>.gz`) or not.

Where files are looked for, per file, first hit wins (a file is `<root>/<dataset-id>/<name>` or `<name>.gz`):
  1. the `data_dir` argument (the CLI's `--data-dir`),
  2. `$LEARNBENCH_DATA`,
  3. `~/.cache/learnbench`,
  4. `/usr/share/datasets` (where Debian's `dataset-fashion-mnist` installs `fashion-mnist/*-ubyte.gz`).
An absent file is downloaded from the dataset's mirrors (or from `$LEARNBENCH_MIRROR/<dataset-id>/<name>.gz` when
that variable is set: serving any data root over HTTP makes a mirror) into the first writable of roots 1-3, through
a temporary file in the target folder that is verified before it is atomically renamed into place.

Every file is verified against the SHA-256 of its *decompressed* content, so a recompressed copy (Debian's are) is
accepted and a changed byte is not. Verified files are remembered by (path, size, mtime) for this process.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from learnbench.errors import UsageError

if TYPE_CHECKING:  # the package imports this module
    from . import DatasetInfo, Splits

SYSTEM_ROOT = Path("/usr/share/datasets")
"""The last root searched (Debian's dataset packages install here); never written to."""
CACHE_SUBDIR = Path(".cache") / "learnbench"
"""The per-user cache root, relative to the home folder."""
MIRROR_ENV = "LEARNBENCH_MIRROR"
DATA_ENV = "LEARNBENCH_DATA"
DOWNLOAD_TIMEOUT_S = 60.0

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_VERIFIED: dict[Path, tuple[int, int]] = {}  # resolved path -> (size, mtime_ns) whose content matched its SHA-256


@dataclass(frozen=True)
class IdxFile:
    """One file of a dataset: its uncompressed name and the SHA-256 of its uncompressed content."""

    name: str
    sha256: str


@dataclass(frozen=True)
class IdxSource:
    """A dataset stored as IDX files."""

    dataset: str
    """Dataset id, also the folder name under each root."""
    files: tuple[IdxFile, ...]
    mirrors: tuple[str, ...]
    """Base URLs tried in order; each serves `<base><name>.gz`."""


# ---- reading ------------------------------------------------------------------------------------------------------


class BadFile(Exception):
    """A file's problem, worded to follow its name ("is truncated (...)"); callers turn it into a `UsageError`."""


def _show(path: Path | str) -> str:
    """A path for messages, with the home folder written `~`."""
    home, text = str(Path.home()), str(path)
    return "~" + text[len(home):] if home not in ("", "/") and text.startswith(home + os.sep) else text


def _decompressed(path: Path, gz: bool | None = None) -> bytes:
    """The file's content, gunzipped when `gz` (by default: when its name ends in `.gz`)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadFile(f"cannot be read ({exc.strerror or exc})") from None
    if not (path.suffix == ".gz" if gz is None else gz):
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise BadFile("is truncated (gzip stream ended early)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise BadFile(f"is corrupt (gzip: {exc})") from None


def parse_idx(data: bytes) -> np.ndarray:
    """The array an IDX byte string holds (a read-only view of `data`, no copy); `BadFile` if malformed."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise BadFile(f"is not an IDX file (bad magic number 0x{data[:4].hex()})")
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise BadFile("is truncated (IDX header cut short)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "too long"
        raise BadFile(f"is {problem} ({len(data):,} bytes where its IDX header {list(dims)} implies {expected:,})")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file, gzipped or not, without checking its digest; `UsageError` naming the file if malformed."""
    path = Path(path)
    try:
        return parse_idx(_decompressed(path))
    except BadFile as exc:
        raise UsageError(f"{_show(path)} {exc}") from None


def _check(data: bytes, spec: IdxFile) -> np.ndarray:
    """Parse and check the digest (the header checks first: they give clearer messages than a digest mismatch)."""
    array = parse_idx(data)
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise BadFile(f"has the wrong content (SHA-256 mismatch: expected {spec.sha256[:16]}..., got {digest[:16]}...)")
    return array


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _read_verified(path: Path, spec: IdxFile, dataset: str) -> np.ndarray:
    """Read and parse; check the digest unless this process already verified this very file."""
    stamp = _stamp(path)
    try:
        data = _decompressed(path)
        if _VERIFIED.get(path.resolve()) == stamp:
            return parse_idx(data)
        array = _check(data, spec)
    except BadFile as exc:
        hint = "; delete it to download it again" if "SHA-256" in str(exc) else ""
        raise UsageError(f"dataset {dataset!r}: {_show(path)} {exc}{hint}") from None
    _VERIFIED[path.resolve()] = stamp
    return array


# ---- finding ------------------------------------------------------------------------------------------------------


def writable_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The roots a download may go to, in order: `data_dir`, `$LEARNBENCH_DATA`, `~/.cache/learnbench`."""
    roots = [Path(data_dir)] if data_dir else []
    if os.environ.get(DATA_ENV):
        roots.append(Path(os.environ[DATA_ENV]))
    roots.append(Path.home() / CACHE_SUBDIR)
    return roots


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every root searched, in order: the writable ones, then `/usr/share/datasets`."""
    return [*writable_roots(data_dir), SYSTEM_ROOT]


def locate(dataset: str, name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first `<root>/<dataset>/<name>` or `<name>.gz` over the search roots (uncompressed first: it loads
    faster), or None."""
    for root in search_roots(data_dir):
        for candidate in (root / dataset / name, root / dataset / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


# ---- downloading --------------------------------------------------------------------------------------------------


def _mirror_urls(source: IdxSource, spec: IdxFile) -> list[str]:
    override = os.environ.get(MIRROR_ENV)
    if override:
        return [f"{override.rstrip('/')}/{source.dataset}/{spec.name}.gz"]
    return [f"{base}{spec.name}.gz" for base in source.mirrors]


def _target_dir(source: IdxSource, data_dir) -> tuple[Path | None, list[Path]]:
    """The first root whose `<dataset>` folder exists or can be made, and is writable; and the folders made."""
    for root in writable_roots(data_dir):
        folder = root / source.dataset
        made = [p for p in (folder, *folder.parents) if not p.exists()][::-1]  # outermost first
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            _remove_empty(made)
            continue
        if os.access(folder, os.W_OK | os.X_OK):
            return folder, made
        _remove_empty(made)
    return None, []


def _remove_empty(folders: list[Path]) -> None:
    """Undo `mkdir(parents=True)`: remove the folders we made, innermost first, if still empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def _fetch_to(url: str, out, label: str) -> None:
    """Stream `url` into the open binary file `out` with a progress bar on stderr."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "learnbench"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr,
                  leave=False, mininterval=0.5) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
        if total is not None and out.tell() != total:
            raise OSError(f"connection closed after {out.tell():,} of {total:,} bytes")


def _download_one(url: str, folder: Path, spec: IdxFile, dataset: str) -> Path:
    """Download into a temporary file beside the target, verify it, then rename it into place."""
    final = folder / f"{spec.name}.gz"
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{spec.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch_to(url, out, f"{dataset}/{final.name}")
        _check(_decompressed(tmp, gz=True), spec)
        os.replace(tmp, final)  # atomic: a reader sees the old state or the whole verified file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _VERIFIED[final.resolve()] = _stamp(final)
    return final


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    if isinstance(exc, BadFile):
        return f"the downloaded file {exc}"
    return str(exc) or type(exc).__name__


def _download(source: IdxSource, spec: IdxFile, data_dir) -> Path:
    """Try each mirror in turn; a `UsageError` naming the file, the roots and every failure if none works."""
    roots = ", ".join(_show(r) for r in search_roots(data_dir))
    missing = f"dataset {source.dataset!r}: {spec.name}[.gz] not found in {roots}"
    folder, made = _target_dir(source, data_dir)
    if folder is None:
        writable = ", ".join(_show(r) for r in writable_roots(data_dir))
        raise UsageError(f"{missing}, and none of {writable} is writable to download it into")
    failures = []
    for url in _mirror_urls(source, spec):
        try:
            return _download_one(url, folder, spec, source.dataset)
        except (OSError, BadFile) as exc:  # URLError, HTTPError and timeouts are OSErrors
            failures.append(f"download from {url} failed: {_reason(exc)}")
    _remove_empty(made)  # a failed download leaves no trace
    raise UsageError(f"{missing} and {'; '.join(failures)}")


# ---- the two entry points the loaders use -------------------------------------------------------------------------


def _find_or_download(source: IdxSource, spec: IdxFile, data_dir) -> Path:
    return locate(source.dataset, spec.name, data_dir) or _download(source, spec, data_dir)


def prepare(source: IdxSource, data_dir: str | os.PathLike | None = None) -> None:
    """Find (or download) and verify every file; a stat per file when this process verified it already."""
    for spec in source.files:
        path = _find_or_download(source, spec, data_dir)
        if _VERIFIED.get(path.resolve()) != _stamp(path):
            _read_verified(path, spec, source.dataset)


def load_arrays(source: IdxSource, data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Every file's array (read-only), keyed by file name, each verified."""
    return {spec.name: _read_verified(_find_or_download(source, spec, data_dir), spec, source.dataset)
            for spec in source.files}


def image_splits(source: IdxSource, info: DatasetInfo, data_dir: str | os.PathLike | None = None) -> Splits:
    """`Splits` of an MNIST-layout dataset: the four files `{train,t10k}-{images-idx3,labels-idx1}-ubyte`, pixels
    scaled by 1/255, `info.n_val` validation images carved from the training set."""
    from . import carve_validation, make_splits

    arrays = load_arrays(source, data_dir)
    images, labels = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]  # [60000, 28, 28] uint8
    train, val = carve_validation(len(labels), info.n_val)

    def scaled(x: np.ndarray) -> np.ndarray:  # uint8 -> float32 in [0, 1]; 255 / 255 is exactly 1
        return np.divide(x[:, None], np.float32(255), dtype=np.float32)  # [N, 1, 28, 28]

    return make_splits(info, (scaled(images[train]), labels[train]), (scaled(images[val]), labels[val]),
                       (scaled(arrays["t10k-images-idx3-ubyte"]), arrays["t10k-labels-idx1-ubyte"]))
