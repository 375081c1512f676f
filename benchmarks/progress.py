"""What compare.py shows and keeps while it measures, so that a long run is never silent.

A full comparison takes minutes. A bar over all the images it will train (its remaining time
is the run's), a line with each figure as it is measured, and results.json rewritten after each
measurement, marked `"complete": false` until the end: a run stopped half-way keeps what it
measured, and nobody waits in front of a blank terminal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from common.files import atomic_write_bytes


class RunProgress:
    """The bar (on stderr, with the tables' lines above it) and the partial results.json."""

    def __init__(self, out: Path, report: dict, total_images: int):
        self.out = out
        self.report = report
        self._bar = tqdm(total=total_images, unit="img", unit_scale=True, dynamic_ncols=True, leave=False)

    def doing(self, what: str) -> None:
        """Name what is being measured now, on the bar."""
        self._bar.set_description(what)

    def trained(self, images: int) -> None:
        """`images` more of the run's training images are done."""
        self._bar.update(images)

    def say(self, text: str) -> None:
        """A line above the bar, kept when the bar moves on (on stderr, as the bar: stdout holds
        only the final tables)."""
        self._bar.write(text, file=sys.stderr)

    def save(self) -> None:
        """results.json as measured so far, whole (written atomically) and marked incomplete."""
        partial = {**self.report, "complete": False}
        atomic_write_bytes(self.out / "results.json", (json.dumps(partial, indent=2) + "\n").encode())

    def close(self) -> None:
        self._bar.close()


def is_complete(results: Path) -> bool:
    """Whether a results.json holds a finished run's report (a partial one says it is not)."""
    try:
        return json.loads(results.read_text()).get("complete", False) is True
    except (OSError, ValueError):
        return False
