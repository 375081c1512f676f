"""Fetch one file over HTTP(S) so that a failed or corrupt download can never replace good data.

The bytes go to a temporary file beside the destination and their SHA-256 is computed while
they stream; only a verified file is renamed into place (atomic on one filesystem), so an
interrupted or wrong download leaves the destination exactly as it was.

pooch (`pooch.retrieve(url, known_hash=...)`) does the same, and is what to reach for in a
project that already depends on it. This core imports only NumPy and the standard library
(plus tqdm for bars), so that both frameworks' users install nothing for it; one verified
fetch over a list of mirrors is these sixty lines, tested in tests/test_mnist_files.py.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

_CHUNK = 1 << 16


class DownloadFailed(Exception):
    """Every mirror failed; `offline` is True when none of them could be reached at all."""

    def __init__(self, message: str, offline: bool):
        super().__init__(message)
        self.offline = offline


def download_verified(urls: list[str], destination: Path, sha256: str, timeout: float = 10.0) -> None:
    """Put the first mirror's copy whose SHA-256 equals `sha256` at `destination`. `timeout`
    bounds the connection and every read, so a host that never answers costs about that long."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.part")
    failures: list[str] = []
    reached_any = False
    try:
        for url in urls:
            tqdm.write(f"downloading {url} (waiting at most {timeout:.0f} s for an answer)", file=sys.stderr)
            try:
                actual = _stream_to_file(url, partial, destination.name, timeout)
            except urllib.error.HTTPError as error:
                reached_any = True
                failures.append(f"{url}: HTTP {error.code}")
                continue
            except (urllib.error.URLError, OSError) as error:
                failures.append(f"{url}: {getattr(error, 'reason', error)}")
                continue
            reached_any = True
            if actual == sha256:
                os.replace(partial, destination)
                return
            failures.append(f"{url}: SHA-256 {actual}, expected {sha256}")
    finally:
        if partial.exists():  # (unlinking a file that was never created fails on a read-only disk)
            partial.unlink()
    raise DownloadFailed("; ".join(failures), offline=not reached_any)


def _stream_to_file(url: str, path: Path, label: str, timeout: float) -> str:
    """Write the body of `url` to `path` with a progress bar; return its SHA-256."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {label}") as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()
