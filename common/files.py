"""Writing run artefacts so that a crash, a full disk or a file-size limit never leaves a
half-written file behind, and a directory that cannot be written is named before any work."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path

from common.errors import OutputError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step: the old file stays intact until the new one is
    complete on disk (temporary file in the same directory, fsync, rename). A write the system
    refuses (no space, a file-size limit, no permission) is an OutputError naming the file."""
    path = Path(path)
    make_directory(path.parent)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # Like open(path, "wb"), honouring the umask, but never following or reusing a file.
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise _cannot_write(path, error) from error
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise _cannot_write(path, error) from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def make_directory(path: Path) -> None:
    """`path` and its missing parents, or an OutputError that names the part in the way."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        in_the_way = next((folder for folder in (Path(path), *Path(path).parents) if os.path.isfile(folder)), None)
        cause = f"{in_the_way} is a file" if in_the_way else _cause(error)
        raise OutputError(f"cannot create the directory {path} ({cause}); choose a directory that can "
                          "be written (nothing was written).") from error


def check_writable_directory(path: Path) -> None:
    """Fail now, before any work, if `path` cannot become a directory that takes files: a parent
    that is a file, a name too long for the file system, no permission. What this check
    creates (the missing directories, a probe file) it removes again."""
    path = Path(path)
    missing = [folder for folder in (path, *path.parents) if not _exists(folder)]
    try:
        make_directory(path)
        descriptor, probe = tempfile.mkstemp(dir=path)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise OutputError(f"cannot write into {path} ({_cause(error)}); choose a directory that can be "
                          "written (nothing was written).") from error
    finally:
        for folder in missing:  # deepest first
            if _exists(folder):
                folder.rmdir()


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long: it does not exist, and make_directory names the cause
        return False


def _cannot_write(path: Path, error: OSError) -> OutputError:
    return OutputError(f"cannot write {path} ({_cause(error)}). Its previous version, if any, is intact: a file "
                       "is replaced only once its new contents are complete. Free some space, raise the "
                       "file-size limit or choose a writable directory, then run again (a training run: "
                       "--resume <run directory>).")


def _cause(error: OSError) -> str:
    return error.strerror or str(error)


def write_json(path: Path, data: object) -> None:
    """Pretty-printed JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
