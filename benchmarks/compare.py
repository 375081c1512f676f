"""PyTorch, JAX (linen) and Flax NNX measured side by side, on the same machine, data and recipe, in one run.

    python benchmarks/compare.py [--quick | --more] [--train] [--batch-sizes 128,512] [--out DIR]

Training throughput (images/s, the shared augmentation pipeline included) of every variant,
measured round-robin so that drift of the machine affects all variants alike; the JAX/PyTorch
ratio of each round, then its median; evaluation throughput; time to the first step and
compile time; peak memory; achieved FLOP/s against the machine's sgemm peak measured in the
same run; the NNX rows also their ratio to the linen step loop of the same layers. With --train,
full training runs of the three trainers: accuracy against epoch and wall-clock time. With
--more, also groups of seeds, every variant's memory and data-parallel scaling, 1
against 2 devices in PyTorch and JAX (benchmarks/scaling.py).
Writes results.json, throughput.png (and accuracy.png) into --out and prints Markdown tables.

It reports as it goes: a progress bar with the time left, each figure as it is measured, and
results.json rewritten after each round, marked incomplete until the end. --out must be new or
empty; a run that fails or is interrupted keeps what it measured, or, stopped before its first
figure, removes what it wrote (see settle).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def interrupted(left: str) -> int:
    """Ctrl-C: one line instead of a traceback, saying what is left, and the shell's status for an
    interrupt. Defined above the imports of torch and JAX so that a Ctrl-C during them can use it."""
    print(f"\ninterrupted: {left}.", file=sys.stderr, flush=True)
    return 130


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> NoReturn:
    """Ctrl-C while torch and JAX import (seconds): nothing is written yet, so end at once. Not with
    an exception, which Python would swallow if it landed in a garbage-collector callback."""
    os._exit(interrupted("nothing was written"))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from benchmarks import scaling  # noqa: E402
from benchmarks.jax_trainer import JaxSeedsTrainer, JaxTrainer  # noqa: E402
from benchmarks.nnx_trainer import NnxTrainer  # noqa: E402
from benchmarks.progress import RunProgress, is_complete  # noqa: E402
from benchmarks.torch_trainer import TorchTrainer  # noqa: E402
from common import cli  # noqa: E402
from common.batching import EpochPlan, plan_epoch  # noqa: E402
from common.errors import UserFacingError  # noqa: E402
from common.files import atomic_write_bytes, check_writable_directory  # noqa: E402
from common.interrupts import catch_interrupts  # noqa: E402
from common.metrics import read_metrics  # noqa: E402
from common.mnist import Mnist  # noqa: E402
from common.recipes import DEFAULT_RECIPE, Recipe, get_recipe  # noqa: E402
from common.settings import RunSettings  # noqa: E402
from common.spec import training_flops_per_image  # noqa: E402
from common.system import huge_page_advice, machine_facts  # noqa: E402
from common.transforms import normalize  # noqa: E402
from jax_impl.fast.compile_clock import compile_seconds, enable_compilation_cache  # noqa: E402

BASELINE = "PyTorch eager"
LINEN_LOOP = "JAX step loop, fast layers"  # what the NNX rows, on the same layers, are also measured against
GROUP_SEEDS = 5  # as the results' final table (docs/results.md): --seeds 0,1,2,3,4
TRAINERS = ("torch_ref.train", "jax_impl.train", "nnx_impl.train")  # --train's full runs

Trainer = TorchTrainer | JaxTrainer | JaxSeedsTrainer | NnxTrainer
# (the settings' recipe and device, the plan whose steps make an epoch, the seeds) -> a trainer
Build = Callable[[RunSettings, EpochPlan, tuple[int, ...]], Trainer]


@dataclass
class Variant:
    """One way of training: its framework, and how to build its trainer for a batch size."""

    name: str
    framework: str
    build: Build
    # torch.compile compiles inside the first call, so its compile time is that call's overhead.
    compiles_on_first_use: bool = False
    seeds: int = 1  # seeds trained together; every seed sees the round's batches


def torch_eager(settings: RunSettings, plan: EpochPlan, seeds: tuple[int, ...]) -> TorchTrainer:
    return TorchTrainer(dataclasses.replace(settings, ops="plain"), plan, seeds)


def torch_channels_last(settings: RunSettings, plan: EpochPlan, seeds: tuple[int, ...]) -> TorchTrainer:
    return TorchTrainer(dataclasses.replace(settings, ops="fast"), plan, seeds)


def torch_compiled(settings: RunSettings, plan: EpochPlan, seeds: tuple[int, ...]) -> TorchTrainer:
    trainer = TorchTrainer(dataclasses.replace(settings, ops="plain"), plan, seeds)
    for state in trainer.states:
        state.network = torch.compile(state.model)
    return trainer


def jax_epoch(epoch: str, ops: str = "auto") -> Build:
    """One seed with the step loop or the scan epoch; ops auto is what --ops auto picks for the device."""

    def build(settings: RunSettings, plan: EpochPlan, seeds: tuple[int, ...]) -> JaxTrainer:
        (seed,) = seeds
        return JaxTrainer(dataclasses.replace(settings, ops=ops, seed=seed), plan, epoch_kind=epoch)

    return build


def nnx_loop(form: str) -> Build:
    """One seed of the NNX twin with the fast layers, its step in `form` (benchmarks/nnx_trainer.py)."""

    def build(settings: RunSettings, plan: EpochPlan, seeds: tuple[int, ...]) -> NnxTrainer:
        (seed,) = seeds
        return NnxTrainer(dataclasses.replace(settings, ops="fast", seed=seed), plan, form)

    return build


def variants(quick: bool, more: bool = False) -> list[Variant]:
    """The variants a run measures: --quick six, a full run also torch.compile and
    NNX's split/merge form, --more also the groups of seeds."""
    found = [Variant(BASELINE, "torch", torch_eager), Variant("PyTorch channels_last", "torch", torch_channels_last)]
    if quick:
        pass  # torch.compile takes minutes to compile here: full runs only
    elif shutil.which(os.environ.get("CXX", "g++")) or shutil.which("cc"):
        found.append(Variant("torch.compile", "torch", torch_compiled, compiles_on_first_use=True))
    found += [Variant("JAX step loop, fast layers", "jax", jax_epoch("loop", "fast")),
              Variant("JAX step loop, plain layers", "jax", jax_epoch("loop", "plain")),
              Variant("JAX lax.scan epoch", "jax", jax_epoch("scan")),
              Variant("NNX step loop (nnx.jit), fast layers", "nnx", nnx_loop("nnx.jit"))]
    if quick:
        return found  # the split/merge form and seed groups: full runs only
    found.append(Variant("NNX step loop (split/merge), fast layers", "nnx", nnx_loop("split/merge")))
    if not more:
        return found
    return found + [Variant(f"PyTorch {GROUP_SEEDS} seeds in turn", "torch", torch_eager, seeds=GROUP_SEEDS),
                    Variant(f"JAX {GROUP_SEEDS} seeds in one program", "jax", JaxSeedsTrainer, seeds=GROUP_SEEDS)]


@dataclass
class Measured:
    """A variant's numbers at one batch size."""

    cold_seconds: float = 0.0  # the first timed chunk: compilation and first-use costs included
    compile_seconds: float = 0.0
    seconds: list[float] = field(default_factory=list)  # per timed chunk
    images: int = 0  # per timed chunk
    eval_images_per_second: float = 0.0
    step_compiler_options: dict = field(default_factory=dict)  # XLA's, for a JAX step that takes them

    @property
    def images_per_second(self) -> float:
        return self.images / statistics.median(self.seconds)

    @property
    def first_step_overhead(self) -> float:
        """What the first chunk cost beyond a warm one: compiling, allocating, first touches
        (0 when timing noise exceeds it, as for eager PyTorch)."""
        return max(0.0, self.cold_seconds - statistics.median(self.seconds))


def train_seconds(trainer: Trainer, plan: EpochPlan, data: Mnist) -> float:
    """One epoch of `plan` for every seed of the trainer (each seed trains on the same batches)."""
    started = time.perf_counter()
    trainer.train_epoch(plan, data.train_images, data.train_labels)
    trainer.synchronize()
    return time.perf_counter() - started


def build_trainer(variant: Variant, settings: RunSettings, plan: EpochPlan) -> Trainer:
    """The variant's trainer of seeds 0, 1, ...; an epoch of it is as many steps as `plan` has."""
    return variant.build(settings, plan, tuple(range(variant.seeds)))


def chunk_images(batch_size: int, args: argparse.Namespace) -> int:
    """The images of one timed chunk: whole batches, at least one."""
    return max(1, args.chunk_images // batch_size) * batch_size


def measure_training(chosen: list[Variant], batch_size: int, data: Mnist, args: argparse.Namespace,
                     recipe: Recipe, progress: RunProgress) -> dict[str, Measured]:
    """Warm up every variant, then time chunks of training round-robin; each round's figures are
    said and saved (`progress`) as soon as they are measured."""
    images = chunk_images(batch_size, args)
    settings = RunSettings(recipe.with_overrides(batch_size=batch_size), device=args.device)
    trainers, results = {}, {}
    warm_up = plan_epoch(0, 1, len(data.train_labels), batch_size, recipe.augmentation).head(images)
    for variant in chosen:
        progress.doing(f"batch {batch_size}, first chunk: {variant.name}")
        compiled_before = time_compiling(variant)
        trainer = build_trainer(variant, settings, warm_up)
        cold_seconds = train_seconds(trainer, warm_up, data)
        trainers[variant.name] = trainer
        results[variant.name] = Measured(cold_seconds, time_compiling(variant) - compiled_before,
                                         step_compiler_options=getattr(trainer, "step_options", {}))
        progress.trained(images * variant.seeds)
        compiling = ("compiling included" if variant.compiles_on_first_use else
                     "nothing to compile" if variant.framework == "torch" else
                     f"compiled in {results[variant.name].compile_seconds:.1f} s")
        progress.say(f"batch {batch_size} | {variant.name}: first chunk {cold_seconds:.1f} s ({compiling})")
    for round_index in range(args.repeats):
        plan = plan_epoch(1, round_index + 1, len(data.train_labels), batch_size, recipe.augmentation).head(images)
        for variant in chosen:
            progress.doing(f"batch {batch_size}, round {round_index + 1}/{args.repeats}: {variant.name}")
            results[variant.name].seconds.append(train_seconds(trainers[variant.name], plan, data))
            results[variant.name].images = len(plan.order) * variant.seeds
            progress.trained(results[variant.name].images)
        progress.say(f"batch {batch_size} | round {round_index + 1}/{args.repeats}, training images/s: " + "; ".join(
            f"{v.name} {results[v.name].images / results[v.name].seconds[-1]:,.0f}" for v in chosen))
        progress.report["throughput"][str(batch_size)] = throughput_entries(chosen, results, progress.report)
        progress.save()
    test_inputs = normalize(data.test_images[: args.eval_images])
    for variant in chosen:
        progress.doing(f"batch {batch_size}, evaluation: {variant.name}")
        trainer = trainers[variant.name]
        trainer.predict(test_inputs[:1000], 1000)  # compile / warm up
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            trainer.predict(test_inputs, 1000)
            times.append(time.perf_counter() - started)
        results[variant.name].eval_images_per_second = len(test_inputs) * variant.seeds / statistics.median(times)
    return results


def time_compiling(variant: Variant) -> float:
    """Seconds JAX has spent compiling in this process (0 for PyTorch, whose torch.compile
    compiles inside its first call: see Variant.compiles_on_first_use)."""
    return 0.0 if variant.framework == "torch" else compile_seconds()


def round_ratios(results: dict[str, Measured], name: str, baseline_name: str = BASELINE) -> list[float]:
    """A variant's images/s over the baseline's, of each round (both timed in the same round)."""
    baseline = results[baseline_name]
    return [(results[name].images / s) / (baseline.images / b) for s, b in
            zip(results[name].seconds, baseline.seconds, strict=True)]


def sgemm_gflops(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """The machine's float32 matrix-multiply rate, measured with both frameworks' BLAS."""
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    rates = {}
    ta = torch.from_numpy(a)
    ja = jax.device_put(a)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(ja))
    for name, run in (("torch", lambda: torch.mm(ta, ta)), ("jax", lambda: jax.block_until_ready(matmul(ja)))):
        run()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        rates[name] = 2 * size**3 / statistics.median(times) / 1e9
    return rates


def xla_flops_per_image(batch_size: int, recipe: Recipe) -> float | None:
    """XLA's own count of the training step's FLOPs, per image (a cross-check of the spec's).
    Counted on the lowered program, from shapes alone, so nothing is initialised or compiled for
    it: the count is the model's arithmetic as traced, before XLA's fusions, which can recompute a
    value in each consumer and so count it more than once."""
    from jax_impl.model import Net
    from jax_impl.optim import learning_rate_schedule, make_optimizer
    from jax_impl.training import create_train_state, train_step

    # Plain layers without dropout, so that the count is the network's (random bits' integer ops would count).
    recipe = recipe.with_overrides(dropout=0.0)
    tx = make_optimizer(recipe, learning_rate_schedule(recipe, 10))
    state, key = jax.eval_shape(lambda: create_train_state(Net(dropout=recipe.dropout), tx, 0, recipe))
    batch = (jax.ShapeDtypeStruct((batch_size, 28, 28, 1), np.float32), jax.ShapeDtypeStruct((batch_size,), np.int32))
    analysis = jax.jit(train_step).lower(state, batch, key).cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    flops = (analysis or {}).get("flops")
    return float(flops) / batch_size if flops else None


def memory_probed(chosen: list[Variant], more: bool) -> set[str]:
    """The variants whose memory is measured, each in a fresh process of its own: every one with
    --more; otherwise the first of each framework, enough to compare the frameworks."""
    if more:
        return {variant.name for variant in chosen}
    return {next(v.name for v in chosen if v.framework == framework) for framework in ("torch", "jax", "nnx")}


def memory_probe(variant_name: str, batch_size: int, args: argparse.Namespace) -> dict[str, float]:
    """Peak memory of one variant, trained for a few batches in a fresh process."""
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", variant_name,
               "--batch-sizes", str(batch_size), "--device", args.device]
    command += cli.data_flags(args)
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def run_probe(args: argparse.Namespace) -> None:
    """--probe: train a few batches of one variant, print its memory as JSON (subprocess side)."""
    data = cli.load_data(args)
    batch_size = args.batch_sizes[0]
    recipe = get_recipe(args.recipe)
    variant = next(v for v in variants(quick=False, more=True) if v.name == args.probe)
    plan = plan_epoch(0, 1, len(data.train_labels), batch_size, recipe.augmentation).head(3 * batch_size)
    settings = RunSettings(recipe.with_overrides(batch_size=batch_size), device=args.device)
    trainer = build_trainer(variant, settings, plan)
    before_mb = _current_rss_mb()
    _reset_peak_rss()
    train_seconds(trainer, plan, data)
    result = {"rss_before_training_mb": before_mb, "peak_rss_mb": _peak_rss_mb()}
    device_peak_mb = trainer.device_peak_mb()
    if device_peak_mb is not None:
        result["device_peak_mb"] = device_peak_mb
    print(json.dumps(result))


def _reset_peak_rss() -> None:
    """Start the high-water mark afresh, so that loading the data does not set the peak
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM; other systems report no memory)."""
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _current_rss_mb() -> float:
    return _status_mb("VmRSS")


def _status_mb(field_name: str) -> float:
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import flax
    import optax

    return {**machine_facts(), "cores": os.cpu_count(), "gpu": gpu,
            "torch_cpu_kernels": torch.backends.cpu.get_cpu_capability(),
            "xla_cpu_isa": xla_cpu_isa(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax_devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "platform": platform.platform()}


# For the duration said at the start: training runs here at 3-13% of the sgemm peak (docs/speed.md),
# a first chunk costs seconds more than a warm one (compiling), a memory probe starts a process.
ESTIMATE_SHARE_OF_PEAK = 0.08
ESTIMATE_FIRST_CHUNK_SECONDS = 10.0
ESTIMATE_PROBE_SECONDS = 20.0
# The smallest batch whose steps map buffers over the largest block glibc reuses (docs/speed.md#huge-pages).
HUGE_PAGE_BATCH = 256


def expected_minutes(total_images: int, variant_count: int, probed: set[str], args: argparse.Namespace,
                     report: dict) -> float:
    """A rough duration of the measuring, from the sgemm peak just measured; the bar's time left
    corrects it as the run goes. --more's scaling and --train's runs come on top."""
    images_per_second = (ESTIMATE_SHARE_OF_PEAK * report["sgemm_gflops"]["peak"] * 1e9
                         / report["flops"]["per_image_from_spec"])
    probes = len(probed) * (1 if args.quick else len(args.batch_sizes))
    seconds = (total_images / images_per_second + len(args.batch_sizes) * variant_count * ESTIMATE_FIRST_CHUNK_SECONDS
               + probes * ESTIMATE_PROBE_SECONDS)
    return seconds / 60


def xla_cpu_isa() -> str:
    """The instruction set XLA:CPU compiles for: the host's widest, unless XLA_FLAGS caps it."""
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith("--xla_cpu_max_isa="):
            return flag.split("=", 1)[1]
    return "the host's"


def machine_line(report: dict) -> str:
    """The CPU, its vector extensions and the sgemm peak: what every ratio in the report depends on."""
    machine = report["machine"]
    extensions = ", ".join(machine.get("vector_extensions") or ["not listed on this OS"])
    pages = machine["huge_pages"]
    return (f"{machine['cpu']}, {machine['usable_cores']} cores ({extensions}; PyTorch's CPU kernels "
            f"{machine['torch_cpu_kernels']}, XLA compiles for {machine['xla_cpu_isa']}"
            + (f", XLA_FLAGS {machine['xla_flags']}" if machine["xla_flags"] else "")
            + (f", transparent huge pages {pages['transparent_hugepages']}" if pages["transparent_hugepages"] else "")
            + (f", GLIBC_TUNABLES {pages['glibc_tunables']}" if pages["glibc_tunables"] else "")
            + f"); sgemm peak {report['sgemm_gflops']['peak']:.0f} GFLOP/s")


def full_training(args: argparse.Namespace, out: Path) -> dict[str, dict]:
    """--train: the three trainers' CLIs with the recipe; accuracy against epoch and time."""
    runs = {}
    for module in TRAINERS:
        run_dir = out / module.split(".")[0]
        command = [sys.executable, "-m", module, "--recipe", args.recipe, "--out", str(run_dir), "--device",
                   args.device]
        command += cli.data_flags(args)
        subprocess.run(command, check=True, cwd=REPO)
        history = read_metrics(run_dir / "metrics.jsonl")
        elapsed = np.cumsum([r.epoch_seconds + r.eval_seconds for r in history])
        accuracy = [r.test_accuracy for r in history]
        runs[module.split(".")[0]] = {
            "epochs": [r.epoch for r in history], "test_accuracy": accuracy, "elapsed_seconds": elapsed.tolist(),
            "final_accuracy": accuracy[-1],
            "seconds_to_99.0": _first_time(elapsed, accuracy, 99.0),
            "seconds_to_99.4": _first_time(elapsed, accuracy, 99.4),
        }
    return runs


def _first_time(elapsed: np.ndarray, accuracy: list[float], target: float) -> float | None:
    return next((float(t) for t, a in zip(elapsed, accuracy, strict=True) if a >= target), None)


def throughput_table(report: dict, batch_size: int) -> str:
    """One batch size's Markdown table, headed by the machine its ratios depend on."""
    entries = report["throughput"][str(batch_size)]
    lines = [f"Batch {batch_size} (median of {report['settings']['repeats']} rounds, "
             f"{next(iter(entries.values()))['images_per_round']} images each), {machine_line(report)}:", "",
             "| variant | train images/s | vs PyTorch eager (median of rounds) | vs linen loop | eval images/s | "
             "first-step overhead s | compile s | peak RSS MB (training +MB) | GFLOP/s | % of sgemm peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in entries.items():
        ratio = f"{entry['ratio_to_pytorch_eager']:.2f}x" if entry.get("ratio_to_pytorch_eager") else "1.00x"
        memory = entry.get("memory")
        memory_text = "" if memory is None else (
            f"{memory['peak_rss_mb']:,.0f} (+{memory['peak_rss_mb'] - memory['rss_before_training_mb']:,.0f})")
        linen = f"{entry['ratio_to_linen_loop']:.2f}x" if "ratio_to_linen_loop" in entry else ""
        lines.append(
            f"| {name} | {entry['train_images_per_second']:,.0f} | {ratio} | {linen} | "
            f"{entry['eval_images_per_second']:,.0f} | {entry['first_step_overhead_seconds']:.2f} | "
            f"{entry['compile_seconds']:.1f} | {memory_text} | {entry['achieved_gflops']:.1f} | "
            f"{entry['percent_of_sgemm_peak']:.1f} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [f"Machine: {machine_line(report)}" + (f"; GPU {machine['gpu']}" if machine["gpu"] else "")
             + f"; torch {machine['torch']}, jax {machine['jax']}, flax {machine['flax']}.", ""]
    for batch_size in report["throughput"]:
        lines += [throughput_table(report, int(batch_size)), ""]
    flops = report["flops"]
    lines.append(f"Training FLOPs per image: {flops['per_image_from_spec'] / 1e6:.2f} M from the spec's layer table "
                 f"(XLA's count of the lowered step: {flops['per_image_xla'] / 1e6:.2f} M); sgemm peak "
                 f"{report['sgemm_gflops']['peak']:.0f} GFLOP/s (torch {report['sgemm_gflops']['torch']:.0f}, "
                 f"jax {report['sgemm_gflops']['jax']:.0f}).")
    if report.get("scaling"):
        where = "2 GPUs against 1" if report["scaling"]["device"] == "gpu" else "2 CPU devices against 1"
        lines += ["", f"Data-parallel scaling, {where} (global batch {report['scaling']['batch_size']}, median of "
                      f"{report['settings']['repeats']} rounds of {report['settings']['chunk_images']} images):", "",
                  scaling.markdown(report["scaling"]["results"])]
    if report.get("training"):
        lines += ["", "| framework | final test accuracy | s to 99.0% | s to 99.4% | total s |",
                  "|---|---:|---:|---:|---:|"]
        for name, run in report["training"].items():
            lines.append(f"| {name} | {run['final_accuracy']:.2f} | {_seconds(run['seconds_to_99.0'])} | "
                         f"{_seconds(run['seconds_to_99.4'])} | {run['elapsed_seconds'][-1]:.0f} |")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f}"


def plots(report: dict, out: Path) -> None:
    batch_sizes = list(report["throughput"])
    names = list(report["throughput"][batch_sizes[0]])
    figure = Figure(figsize=(10, 4.5))
    axis = figure.subplots()
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        values = [report["throughput"][b][name]["train_images_per_second"] for b in batch_sizes]
        axis.bar(np.arange(len(batch_sizes)) + index * width, values, width, label=name)
    axis.set_xticks(np.arange(len(batch_sizes)) + width * (len(names) - 1) / 2, [f"batch {b}" for b in batch_sizes])
    axis.set_ylabel("training images/s")
    axis.set_title(f"Training throughput, {report['machine']['cpu']}")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "throughput.png", dpi=100)
    if report.get("training"):
        figure = Figure(figsize=(12, 4.5))
        axes = figure.subplots(1, 2)
        for name, run in report["training"].items():
            axes[0].plot(run["epochs"], run["test_accuracy"], marker="o", label=name)
            axes[1].plot(run["elapsed_seconds"], run["test_accuracy"], marker="o", label=name)
        for axis, label in zip(axes, ("epoch", "wall-clock seconds (training + evaluation)"), strict=True):
            axis.set_xlabel(label)
            axis.set_ylabel("test accuracy (%)")
            axis.axhline(99.4, color="grey", linestyle=":")
            axis.grid(alpha=0.3)
            axis.legend()
        figure.tight_layout()
        figure.savefig(out / "accuracy.png", dpi=100)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                        help="a smoke run of about a minute: batch 128 only, 3 rounds, small chunks, no "
                             "torch.compile or NNX split/merge")
    size.add_argument("--more", action="store_true",
                        help="also the longer sections: groups of 5 seeds, the memory of every variant, "
                             "data-parallel scaling from 1 device to 2")
    parser.add_argument("--train", action="store_true", help="also train the three trainers fully with --recipe")
    parser.add_argument("--batch-sizes", type=_positive_list, default=None,
                        help="comma-separated batch sizes (default: 128,512; quick 128)")
    parser.add_argument("--repeats", type=_positive_int, default=None,
                        help="timed rounds per batch size (default 5; quick 3)")
    parser.add_argument("--chunk-images", type=_positive_int, default=None,
                        help="images per timed chunk (default 8192; quick 1024)")
    parser.add_argument("--eval-images", type=_positive_int, default=10000, help="test images per evaluation timing")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe (default: {DEFAULT_RECIPE})")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="as for training")
    cli.add_data_flags(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default: benchmarks/results/<date-time>)")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: memory of one variant
    args = parser.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([128] if args.quick else [128, 512])
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.chunk_images = args.chunk_images or (1024 if args.quick else 8192)
    if args.quick:
        args.eval_images = min(args.eval_images, 2000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return compare(args)
    except UserFacingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before --out was touched; compare reports the later ones itself
        return interrupted("nothing was written")


def compare(args: argparse.Namespace) -> int:
    """Everything but the argument parsing: bad data, recipes or --out end in UserFacingError, and a
    Ctrl-C once --out is checked ends here, in 130, after the clean-up (settle)."""
    enable_compilation_cache()
    if args.probe:
        run_probe(args)
        return 0
    started = time.perf_counter()
    recipe = get_recipe(args.recipe)
    data = cli.load_data(args)  # before --out exists, so that a data error leaves nothing behind
    if max(args.batch_sizes) > len(data.train_labels):
        raise UserFacingError(f"--batch-sizes {max(args.batch_sizes)} is larger than the {len(data.train_labels):,} "
                              "training images; choose smaller batches.")
    out = args.out or REPO / "benchmarks" / "results" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    created = check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        report = measure(args, recipe, data, out, started)
        plots(report, out)
        # Last, and whole or not at all: the results.json marked complete (see settle).
        report["complete"] = True
        atomic_write_bytes(out / "results.json", (json.dumps(report, indent=2) + "\n").encode())
        print(markdown(report))
        print(f"\nresults in {out} ({report['wall_seconds']:.0f} s)")
    except KeyboardInterrupt:
        return interrupted(settle(out, created))
    except BaseException:
        settle(out, created)
        raise
    return 0


def check_out(out: Path) -> Path | None:
    """Refuse a file, or a directory that holds anything, before minutes of measuring: what a failed
    run wrote can be told apart from what was there, and removed alone, only in a new or empty
    directory. Returns the topmost directory the run will create (None when --out exists)."""
    if os.path.isfile(out):
        raise UserFacingError(f"--out {out} is a file; choose a directory for the results.")
    if os.path.isdir(out) and any(out.iterdir()):
        raise UserFacingError(f"--out {out} is not empty; choose another --out, or empty it (nothing was measured "
                              "or changed).")
    created = next((folder for folder in reversed([out, *out.parents]) if not os.path.exists(folder)), None)
    check_writable_directory(out)  # under a file, a name too long, no permission: said now, nothing left
    return created


def settle(out: Path, created: Path | None) -> str:
    """After a failure or a Ctrl-C: keep what the run measured once its results.json exists
    (complete, or the figures so far, marked incomplete), else remove everything it wrote, and
    say which, for the user.

    --out is created when the run starts rather than when there is something to write: --train's
    runs write into it minutes before the report, so a failure must remove what it wrote anyway,
    and one rule (made at the start, removed unless something was measured) covers every step;
    and an --out that cannot be made fails at once, not after the measuring."""
    results = out / "results.json"
    if results.exists():  # this run's: --out was new or empty
        if is_complete(results):
            return f"the results in {out} are complete and kept"
        return f"the figures measured so far are kept in {results} (marked incomplete)"
    # The directories this run made, or, in an --out that existed (empty), all that is in it now.
    for path in [created] if created else list(out.iterdir()):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return f"nothing was kept ({out} is as it was before the run)"


def measure(args: argparse.Namespace, recipe: Recipe, data: Mnist, out: Path, started: float) -> dict:
    """Every number of the report, each said and saved into a partial results.json as it is
    measured; with --train also the full runs, which train into `out`."""
    chosen = variants(args.quick, args.more)
    probed = memory_probed(chosen, args.more)
    sgemm = sgemm_gflops()
    sgemm["peak"] = max(sgemm.values())
    flops_per_image = training_flops_per_image()
    report = {"settings": {"quick": args.quick, "more": args.more, "repeats": args.repeats,
                           "chunk_images": args.chunk_images, "recipe": args.recipe, "device": args.device,
                           "batch_sizes": args.batch_sizes},
              "machine": machine(), "sgemm_gflops": sgemm,
              "flops": {"per_image_from_spec": flops_per_image,
                        "per_image_xla": xla_flops_per_image(args.batch_sizes[0], recipe)},
              "throughput": {}}
    total_images = sum(chunk_images(b, args) * (args.repeats + 1) * sum(v.seeds for v in chosen)
                       for b in args.batch_sizes)
    progress = RunProgress(out, report, total_images)
    try:
        minutes = expected_minutes(total_images, len(chosen), probed, args, report)
        progress.say(f"Measuring {len(chosen)} variants at batch {', '.join(map(str, args.batch_sizes))} on "
                     f"{machine_line(report)}: about {minutes:.0f} min expected; each figure is printed, and saved to "
                     f"{out / 'results.json'}, as it is measured.")
        advice = huge_page_advice(report["machine"]["huge_pages"])
        if advice and max(args.batch_sizes) >= HUGE_PAGE_BATCH:
            progress.say(f"This kernel gives huge pages only on request: at batch {HUGE_PAGE_BATCH} or more, the "
                         "steps whose buffers are not in JAX's heaps (PyTorch's, nnx.jit's) fault them in 4 KiB at a "
                         f"time. {advice} before the command makes them faster (docs/speed.md#huge-pages).")
        for batch_size in args.batch_sizes:
            results = measure_training(chosen, batch_size, data, args, recipe, progress)
            entries = report["throughput"][str(batch_size)] = throughput_entries(chosen, results, report)
            progress.save()
            for name in [v.name for v in chosen if v.name in probed and (batch_size == args.batch_sizes[0] or
                                                                         not args.quick)]:
                progress.doing(f"batch {batch_size}, memory (a fresh process): {name}")
                entries[name]["memory"] = memory_probe(name, batch_size, args)
                progress.save()
            progress.say("\n" + throughput_table(report, batch_size) + "\n")
        if args.more:  # four fresh processes that each compile or start a process group
            device = "gpu" if torch.cuda.device_count() >= 2 and args.device != "cpu" else "cpu"
            batch_size = max(args.batch_sizes)
            progress.doing("data-parallel scaling, 1 device against 2 (four fresh processes)")
            report["scaling"] = {"device": device, "batch_size": batch_size, "results": scaling.measure_all(
                device, batch_size, args.repeats, args.chunk_images, cli.data_flags(args))}
            progress.save()
    finally:
        progress.close()
    if args.train:
        report["training"] = full_training(args, out)
    report["wall_seconds"] = time.perf_counter() - started
    return report


def throughput_entries(chosen: list[Variant], results: dict[str, Measured], report: dict) -> dict[str, dict]:
    """The report's figures of each variant at one batch size, over the rounds measured so far."""
    flops_per_image, peak = report["flops"]["per_image_from_spec"], report["sgemm_gflops"]["peak"]
    entries = {}
    for variant in chosen:
        measured = results[variant.name]
        entry = {"framework": variant.framework, "train_images_per_second": measured.images_per_second,
                 "round_seconds": measured.seconds, "images_per_round": measured.images,
                 "eval_images_per_second": measured.eval_images_per_second,
                 "first_step_overhead_seconds": measured.first_step_overhead,
                 "compile_seconds": (measured.first_step_overhead if variant.compiles_on_first_use
                                     else measured.compile_seconds),
                 "achieved_gflops": measured.images_per_second * flops_per_image / 1e9,
                 "step_compiler_options": measured.step_compiler_options}
        entry["percent_of_sgemm_peak"] = 100 * entry["achieved_gflops"] / peak
        if variant.name != BASELINE:
            ratios = round_ratios(results, variant.name)
            entry["ratio_to_pytorch_eager"] = statistics.median(ratios)
            entry["round_ratios"] = ratios
        if variant.framework == "nnx":
            entry["ratio_to_linen_loop"] = statistics.median(round_ratios(results, variant.name, LINEN_LOOP))
        entries[variant.name] = entry
    return entries


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, main() reports a Ctrl-C itself
    catch_interrupts()  # a Ctrl-C that lands in one of JAX's garbage-collector callbacks is delivered again
    status = main()
    if status == 130:  # after a Ctrl-C in XLA's compiler, the interpreter's teardown can crash (SIGSEGV): skip it
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)
