"""One run per directory at a time: the process writing a run directory holds an operating-system
lock on a file in it, so that a second run started on the same --out is refused, however close
together they start. The system drops the lock when the process ends, even by SIGKILL, so no
stale claim outlives a crash and --resume needs no clean-up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from common.errors import OutputError, UserFacingError
from common.files import make_directory

LOCK_NAME = ".run.lock"


class DirectoryClaim:
    """The lock on `directory` (created if missing) until `release` or the end of the process."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        make_directory(self.directory)
        try:
            self._handle: BinaryIO | None = open(self.directory / LOCK_NAME, "a+b")  # noqa: SIM115 (held open)
        except OSError as error:
            raise OutputError(f"cannot write into {self.directory} ({error.strerror or error}); choose a "
                              "directory that can be written.") from error
        if not _try_lock(self._handle):
            self.release()
            raise UserFacingError(f"{self.directory} is being written by another run right now; wait for it to "
                                  "end, or choose another --out (nothing was written).")

    def release(self) -> None:
        """Let another run (a --resume) write here; closing the file drops the lock."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _try_lock(handle: BinaryIO) -> bool:
    """An exclusive lock without waiting: flock on POSIX, a one-byte region lock on Windows."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
