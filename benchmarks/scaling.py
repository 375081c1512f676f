"""Data-parallel scaling: training throughput of each framework on 1 and on 2 devices.

    python benchmarks/scaling.py [--batch-size 256] [--rounds 5] [--device cpu]

On a CPU, 2 devices with 1 thread each against 1 device with 2 threads: JAX splits every
batch over 2 CPU devices in one process (XLA's thread pool limited to one thread per device),
PyTorch over 2 gloo processes of one thread each (DistributedDataParallel, started by
torch.distributed.run). On GPUs, 1 GPU against 2. Every configuration runs in a fresh process
(the device count and the threads are fixed when a framework starts), trains as the
trainer's own train() does (benchmarks/jax_trainer.py, benchmarks/torch_trainer.py) and
reports the median images/s of its timed rounds; compare.py includes the table.
Speed-up = images/s on 2 / images/s on 1; efficiency = speed-up / 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import cli  # noqa: E402
from common.batching import plan_epoch  # noqa: E402
from common.recipes import DEFAULT_RECIPE, get_recipe  # noqa: E402
from common.settings import RunSettings  # noqa: E402
from common.system import usable_cpu_count  # noqa: E402

RESULT_PREFIX = "scaling-result "


def configurations(device: str) -> list[tuple[str, str, int, list[str], dict[str, str]]]:
    """(framework, label, devices, command prefix, environment) of every measured setting."""
    script = [str(Path(__file__).resolve())]
    python = [sys.executable]
    cores = usable_cpu_count()
    one_thread_per_device = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    on_cpu = device == "cpu"
    return [
        ("jax", f"1 device{f', {cores} threads' if on_cpu else ''}", 1, python + script, {}),
        ("jax", f"2 devices{', 1 thread each' if on_cpu else ''}", 2, python + script,
         one_thread_per_device if on_cpu else {}),
        ("torch", f"1 process{f', {cores} threads' if on_cpu else ''}", 1, python + script, {}),
        ("torch", f"2 processes{', 1 thread each' if on_cpu else ''}", 2, torchrun + script, {"OMP_NUM_THREADS": "1"}),
    ]


def measure_all(device: str, batch_size: int, rounds: int, chunk_images: int, data_flags: list[str]) -> list[dict]:
    """Every configuration in its own process, one after the other; `data_flags` as cli.data_flags gives them."""
    results = []
    for framework, label, devices, command, environment in configurations(device):
        worker = [*command, "--worker", framework, "--devices", str(devices), "--device", device,
                  "--batch-size", str(batch_size), "--rounds", str(rounds), "--chunk-images", str(chunk_images),
                  *data_flags]
        output = subprocess.run(worker, cwd=REPO, capture_output=True, text=True, check=True,
                                env={**os.environ, **environment}).stdout
        line = next(line for line in output.splitlines() if line.startswith(RESULT_PREFIX))
        results.append({"framework": framework, "setting": label, "devices": devices,
                        **json.loads(line[len(RESULT_PREFIX):])})
    for result in results:
        single = next(r for r in results if r["framework"] == result["framework"] and r["devices"] == 1)
        result["speed_up"] = result["images_per_second"] / single["images_per_second"]
        result["efficiency"] = result["speed_up"] / result["devices"]
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| framework | setting | train images/s | speed-up | efficiency |", "|---|---|---:|---:|---:|"]
    for r in results:
        name = "JAX" if r["framework"] == "jax" else "PyTorch"
        lines.append(f"| {name} | {r['setting']} | {r['images_per_second']:,.0f} | {r['speed_up']:.2f}x | "
                     f"{100 * r['efficiency']:.0f}% |")
    return "\n".join(lines)


def worker(args: argparse.Namespace) -> None:
    """One configuration: the trainer's state and step, a warm-up chunk, then timed rounds."""
    if args.worker == "jax":
        from benchmarks.jax_trainer import JaxTrainer as Trainer
        from jax_impl.distributed import join_processes
        from jax_impl.fast.compile_clock import enable_compilation_cache

        enable_compilation_cache()
    else:
        from benchmarks.torch_trainer import TorchTrainer as Trainer
        from torch_ref.distributed import join_processes
    processes = join_processes(args.device, args.devices if args.devices > 1 else None)
    recipe = get_recipe(DEFAULT_RECIPE).with_overrides(batch_size=args.batch_size)
    data = cli.load_data(args)
    steps = max(1, args.chunk_images // args.batch_size)
    plans = [plan_epoch(0, round_index + 1, len(data.train_labels), args.batch_size, recipe.augmentation)
             .head(steps * args.batch_size) for round_index in range(args.rounds + 1)]
    trainer = Trainer(RunSettings(recipe, device=args.device, devices=args.devices), plans[0], processes=processes)
    seconds = []
    for plan in plans:  # round 0 warms up (compiles)
        started = time.perf_counter()
        trainer.train_epoch(plan, data.train_images, data.train_labels)  # reads every step's loss: waits for it
        seconds.append(time.perf_counter() - started)
    if processes.is_main:
        print(RESULT_PREFIX + json.dumps({"images_per_second": steps * args.batch_size / statistics.median(seconds[1:]),
                                          "round_seconds": seconds[1:], "describe": trainer.describe()}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size (default: 256)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per setting (default: 5)")
    parser.add_argument("--chunk-images", type=int, default=8192, help="images per round (default: 8192)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="cpu (default) or gpu")
    cli.add_data_flags(parser)
    parser.add_argument("--worker", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    print(markdown(measure_all(args.device, args.batch_size, args.rounds, args.chunk_images, cli.data_flags(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
