"""The run directory: created only after every input has been validated, and locked while a run writes to it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import UsageError


def prepare_run_dir(run_dir: Path) -> None:
    """Create RUN_DIR (and its parents); a folder that cannot be written is a UsageError."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"output path {run_dir} exists and is not a folder")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the run directory {run_dir}: {existing} is not writable")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the run directory {run_dir}: {exc.strerror}") from None


class RunDirLock:
    """An exclusive `flock` on RUN_DIR/.lock: a second learnbench process writing the same run gets a clear error.
    The kernel drops the lock when the holder dies, even by SIGKILL, so a crash never leaves a stale lock."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunDirLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UsageError(f"{self.path.parent} is in use by another learnbench run (pid {holder}); "
                             "wait for it or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
