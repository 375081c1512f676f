"""What bridge.diff found: one check per tensor compared, in order, and the first divergence."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

STAGES = ("forward-eval", "forward-train", "running-stats", "gradients", "step")
TOLERANCES = {"float64": 1e-10, "float32": 1e-5}  # max|flax - torch| / max|torch|, per tensor


@dataclass(frozen=True)
class Check:
    """One tensor compared: `torch` is a module path (forward stages) or a state_dict key, `flax`
    the Flax path joined with '/'; rel = max|flax - torch| / max|torch| (inf: shapes differ)."""

    stage: str
    torch: str
    flax: str
    rel: float
    tolerance: float
    ok: bool
    note: str = ""


@dataclass
class Report:
    """Every check in order; the first failing one, with a hint when it matches a classic mistake."""

    dtype: str
    checks: list[Check] = field(default_factory=list)
    first_divergence: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return self.first_divergence is None

    def to_json(self) -> dict:
        checks = [{**{k: v for k, v in asdict(check).items() if k != "note"},
                   "rel": check.rel if np.isfinite(check.rel) else None} for check in self.checks]
        first = self.first_divergence
        if first is not None and not np.isfinite(first["rel"]):
            first = {**first, "rel": None}  # not comparable (shapes differ, or a side raised): see "note"
        return {"equal": self.equal, "dtype": self.dtype, "checks": checks,
                "first_divergence": first, "notes": self.notes}

    def summary(self) -> str:
        lines = []
        for stage in STAGES:
            checks = [c for c in self.checks if c.stage == stage]
            if checks:
                worst = max(c.rel for c in checks)
                verdict = "ok" if all(c.ok for c in checks) else f"{sum(not c.ok for c in checks)} differ"
                lines.append(f"{stage:<14} {len(checks):>3} tensors   largest rel {worst:.1e}   {verdict}")
        lines.extend(f"note: {note}" for note in self.notes)
        first = self.first_divergence
        if first is None:
            lines.append(f"equal: every check within {self.checks[0].tolerance:g} ({self.dtype})" if self.checks
                         else "nothing compared")
        else:
            note = f"  ({first['note']})" if first.get("note") else ""
            lines.append(f"first divergence: {first['stage']}, PyTorch {first['torch']} / Flax {first['flax']}: "
                         f"rel {first['rel']:.3g} > {first['tolerance']:g}{note}")
            if first["hint"]:
                lines.append(f"hint: {first['hint']}")
        return "\n".join(lines)


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max|ours - theirs| / max|theirs|; 0 for two zero tensors, inf for other shapes."""
    if ours.shape != theirs.shape:
        return float("inf")
    scale = float(np.abs(theirs).max()) if theirs.size else 0.0
    difference = float(np.abs(ours.astype(np.float64) - theirs).max()) if theirs.size else 0.0
    if not np.isfinite(difference):
        return float("inf")
    return difference / scale if scale else (0.0 if difference == 0 else float("inf"))


