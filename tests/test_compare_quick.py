"""benchmarks/compare.py --quick end to end: the report's schema and sanity, never its speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # compare.py --quick: both frameworks timed, memory probed in fresh processes

VARIANTS = {"PyTorch eager", "PyTorch channels_last", "JAX step loop, fast layers", "JAX step loop, plain layers",
            "JAX lax.scan epoch", "NNX step loop (nnx.jit), fast layers"}


def numbers(value):
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)


def test_quick_comparison_writes_a_complete_report(tmp_path, synthetic_dir):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "benchmarks/compare.py", "--quick", "--out", str(out), "--data-dir", str(synthetic_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| JAX step loop, fast layers |" in result.stdout and "| JAX step loop, plain layers |" in result.stdout
    assert "| NNX step loop (nnx.jit), fast layers |" in result.stdout
    report = json.loads((out / "results.json").read_text())
    assert {"settings", "machine", "sgemm_gflops", "flops", "throughput", "wall_seconds"} <= set(report)
    assert report["complete"] is True
    assert {"cpu", "cores", "torch", "jax", "flax", "optax", "numpy", "python", "vector_extensions",
            "torch_cpu_kernels", "xla_cpu_isa", "xla_flags", "huge_pages"} <= set(report["machine"])
    # It reports as it goes: the expected duration first, then each round's figures before the end.
    progress = [line for line in result.stderr.splitlines() if line.startswith(("Measuring", "batch 128 |"))]
    assert progress[0].startswith("Measuring 6 variants at batch 128 on ") and " min expected" in progress[0]
    assert sum("round" in line for line in progress) == 3
    # Every table names the CPU and the sgemm peak its ratios depend on.
    assert f"{report['machine']['cpu']}, " in result.stdout.split("| variant |")[0]
    assert "sgemm peak" in result.stdout.split("| variant |")[0]
    assert set(report["throughput"]) == {"128"}
    for entries in report["throughput"].values():
        assert set(entries) == VARIANTS
        for name, entry in entries.items():
            assert {"train_images_per_second", "eval_images_per_second", "first_step_overhead_seconds",
                    "compile_seconds", "achieved_gflops", "percent_of_sgemm_peak", "round_seconds"} <= set(entry)
            assert ("ratio_to_pytorch_eager" in entry) == (name != "PyTorch eager")
            assert ("ratio_to_linen_loop" in entry) == (entry["framework"] == "nnx")
            assert entry["train_images_per_second"] > 0 and entry["eval_images_per_second"] > 0
            # --quick probes the memory of one variant per framework, each in a fresh process.
            probed = name in {"PyTorch eager", "JAX step loop, fast layers", "NNX step loop (nnx.jit), fast layers"}
            assert ("memory" in entry) == probed
            assert not probed or entry["memory"]["peak_rss_mb"] > 0
            # On the CPU the JAX step loops compile their step in heaps; nnx.jit takes no options, PyTorch none.
            assert bool(entry["step_compiler_options"]) == name.startswith("JAX step loop")
            # Each JAX or NNX variant compiles (or loads from the cache) its own programs; PyTorch compiles nothing.
            assert (entry["compile_seconds"] > 0) == (entry["framework"] != "torch")
    assert report["flops"]["per_image_from_spec"] == 5_093_952
    assert report["flops"]["per_image_xla"] > 0
    values = list(numbers(report))
    assert values and all(math.isfinite(v) and v >= 0 for v in values)
    assert (out / "throughput.png").stat().st_size > 0
