"""Recipe search on the validation split: train candidates, then tabulate what was tried.

    python benchmarks/recipe_search.py run NAME [--seed S] [--framework jax|torch] [--data-dir DIR]
    python benchmarks/recipe_search.py report [--root runs/search]

Every candidate trains on the first 55,000 training images and is scored on the last 5,000
(`--validation`); the test set is never looked at while choosing. Candidates are the seed recipe
with some fields replaced, listed in CANDIDATES in the order they were tried; `report` prints
the Markdown table kept in docs/recipe_search.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.metrics import read_metrics  # noqa: E402
from common.recipes import SEED, Augmentation, OneCycleSchedule, SWASchedule  # noqa: E402

ONE_CYCLE = OneCycleSchedule(pct_start=0.3, div_factor=10.0, final_div_factor=100.0)
# Annealing to 0.02 (peak / 10) instead of 0.0002: SWA's setting, averaging weights that still move.
ONE_CYCLE_HIGH_TAIL = OneCycleSchedule(pct_start=0.3, div_factor=10.0, final_div_factor=1.0)
ONE_CYCLE_SHORT_WARM_UP = OneCycleSchedule(pct_start=0.15, div_factor=10.0, final_div_factor=100.0)

# Each candidate is named after the one it modifies, and written as that one's fields plus the change.
ONECYCLE = {"schedule": ONE_CYCLE, "lr": 0.1, "batch_size": 128, "dropout": 0.05,
            "augmentation": Augmentation(crop_prob=0.1, crop_size=22, max_rotation=10.0)}
LIGHT = {**ONECYCLE, "dropout": 0.02, "augmentation": Augmentation(crop_prob=0.1, crop_size=22, max_rotation=7.0)}
NODROP = {**LIGHT, "lr": 0.2, "dropout": 0.0}
LIGHTER = {**LIGHT, "augmentation": Augmentation(crop_prob=0.0, crop_size=22, max_rotation=5.0)}
BEST = {**LIGHT, "lr": 0.2}  # light-peak0.2, the `best` recipe

# name -> (what changes, in words; the fields replaced)
CANDIDATES: dict[str, tuple[str, dict]] = {
    "seed": ("the original recipe", {}),
    "onecycle": ("OneCycle (peak 0.1), batch 128, dropout 0.05, rotation 10", ONECYCLE),
    "light": ("onecycle with lighter regularisation: dropout 0.02, rotation 7", LIGHT),
    "bs64": ("onecycle at batch 64 (twice the steps)", {**ONECYCLE, "batch_size": 64}),
    "light-peak0.2": ("light with a OneCycle peak of 0.2", {**LIGHT, "lr": 0.2}),
    "lighter": ("light with no crop and rotation 5", LIGHTER),
    "lighter-peak0.2": ("lighter with a OneCycle peak of 0.2", {**LIGHTER, "lr": 0.2}),
    "lighter-peak0.2-nesterov": ("lighter-peak0.2 with Nesterov momentum", {**LIGHTER, "lr": 0.2, "nesterov": True}),
    "light-peak0.2-wd1e-4": ("light-peak0.2 with weight decay 1e-4", {**LIGHT, "lr": 0.2, "weight_decay": 1e-4}),
    "light-peak0.2-nodrop": ("light-peak0.2 with dropout 0 (the layers stay, as identities)", NODROP),
    "light-peak0.4": ("light with a OneCycle peak of 0.4", {**LIGHT, "lr": 0.4}),
    "light-peak0.2-bs64": ("light-peak0.2 at batch 64 (twice the steps)", {**LIGHT, "lr": 0.2, "batch_size": 64}),
    "peak0.2-noreg": ("light-peak0.2 with no augmentation and dropout 0: how far the model fits",
                      {**LIGHT, "lr": 0.2, "dropout": 0.0,
                       "augmentation": Augmentation(crop_prob=0.0, crop_size=22, max_rotation=0.0)}),
    "nodrop-rot10": ("light-peak0.2-nodrop with rotation 10",
                     {**NODROP, "augmentation": Augmentation(crop_prob=0.1, crop_size=22, max_rotation=10.0)}),
    "nodrop-pct0.15": ("light-peak0.2-nodrop warming up over 15% of the steps instead of 30%",
                       {**NODROP, "schedule": ONE_CYCLE_SHORT_WARM_UP}),
    "light-mom0.95": ("light with momentum 0.95 (same lr / (1 - momentum) as light-peak0.2)",
                      {**LIGHT, "momentum": 0.95}),
    "light-peak0.2-ls0.05": ("light-peak0.2 with label smoothing 0.05", {**LIGHT, "lr": 0.2, "label_smoothing": 0.05}),
    "light-peak0.2-shift1": ("light-peak0.2 with shifts of up to 1 pixel across and down",
                             {**LIGHT, "lr": 0.2, "augmentation": Augmentation(crop_prob=0.1, crop_size=22,
                                                                               max_rotation=7.0, max_translation=1)}),
    "light-peak0.2-shift2": ("light-peak0.2 with shifts of up to 2 pixels across and down",
                             {**LIGHT, "lr": 0.2, "augmentation": Augmentation(crop_prob=0.1, crop_size=22,
                                                                               max_rotation=7.0, max_translation=2)}),
    # Issue 17: weight averaging and BatchNorm recalibration on top of `best`. None of them changes
    # the training trajectory, so a candidate's seed is paired with the same seed of best-again.
    "best-again": ("light-peak0.2 again, with the code that averages, as the pairing baseline", BEST),
    "best-ema0.999": ("best evaluated with an EMA of its weights after every step, decay 0.999",
                      {**BEST, "average": "ema", "ema_decay": 0.999}),
    "best-ema0.999-recal": ("best-ema0.999 with the average's BatchNorm statistics recomputed after training",
                            {**BEST, "average": "ema", "ema_decay": 0.999, "recalibrate_bn": "final"}),
    "best-swa8-recal": ("best evaluated with the mean of its weights after epochs 8-15 (SWA), statistics recomputed",
                        {**BEST, "average": "swa", "swa_start": 8, "recalibrate_bn": "final"}),
    "tail0.02-swa8-recal": ("best-swa8-recal annealing only to lr 0.02, so that the averaged weights differ more",
                            {**BEST, "schedule": ONE_CYCLE_HIGH_TAIL, "average": "swa", "swa_start": 8,
                             "recalibrate_bn": "final"}),
    "tail0.02-swa11-recal": ("tail0.02-swa8-recal averaging epochs 11-15 only",
                             {**BEST, "schedule": ONE_CYCLE_HIGH_TAIL, "average": "swa", "swa_start": 11,
                              "recalibrate_bn": "final"}),
    # Issue 33: schedules made for SWA (SWASchedule): OneCycle (peak 0.2, down to 0.02) over the
    # epochs before the averaging, then SWALR's learning rate over the averaged epochs.
    "swalr0.02-swa11": ("tail0.02-swa11-recal with OneCycle over epochs 1-10, then lr 0.02 held over 11-15",
                        {**BEST, "schedule": SWASchedule(swa_lr=0.02), "average": "swa", "swa_start": 11,
                         "recalibrate_bn": "final"}),
    "swalr0.05-swa11": ("swalr0.02-swa11 with SWALR up to lr 0.05 over epoch 11 (cosine), then held",
                        {**BEST, "schedule": SWASchedule(swa_lr=0.05, anneal_epochs=1), "average": "swa",
                         "swa_start": 11, "recalibrate_bn": "final"}),
    "swalr0.02-swa8": ("swalr0.02-swa11 averaging epochs 8-15 (OneCycle over epochs 1-7)",
                       {**BEST, "schedule": SWASchedule(swa_lr=0.02), "average": "swa", "swa_start": 8,
                        "recalibrate_bn": "final"}),
    # Issue 33: the zoom (Augmentation.max_scale) on best-swa (tail0.02-swa11-recal).
    "best-swa-zoom0.05": ("tail0.02-swa11-recal with zooms drawn from 0.95-1.05",
                          {**BEST, "augmentation": Augmentation(crop_prob=0.1, crop_size=22, max_rotation=7.0,
                                                                max_scale=0.05),
                           "schedule": ONE_CYCLE_HIGH_TAIL, "average": "swa", "swa_start": 11,
                           "recalibrate_bn": "final"}),
    "best-swa-zoom0.1": ("tail0.02-swa11-recal with zooms drawn from 0.9-1.1",
                         {**BEST, "augmentation": Augmentation(crop_prob=0.1, crop_size=22, max_rotation=7.0,
                                                               max_scale=0.1),
                          "schedule": ONE_CYCLE_HIGH_TAIL, "average": "swa", "swa_start": 11,
                          "recalibrate_bn": "final"}),
}


def recipe_for(name: str):
    _, fields = CANDIDATES[name]
    return SEED.with_overrides(name=f"search-{name}", **fields)


def run(args: argparse.Namespace) -> None:
    from common.mnist import resolve_data_dir
    from common.settings import RunSettings

    if args.framework == "jax":
        from jax_impl.fast.compile_clock import enable_compilation_cache
        from jax_impl.train import train

        enable_compilation_cache()
    else:
        from torch_ref.train import train
    out = Path(args.root) / f"{args.name}-{args.framework}-seed{args.seed}"
    settings = RunSettings(recipe=recipe_for(args.name), seed=args.seed, test_batch_size=1000,
                           data_dir=resolve_data_dir(args.data_dir), data_source="idx", out=out, dry_run=False,
                           validation=True, device="cpu", ops="auto", threads=args.threads, devices=None,
                           save_model=False)
    train(settings)


def report(args: argparse.Namespace) -> None:
    rows = ["| candidate | change from the seed recipe | validation accuracy after epoch 15, % (run) "
            "| mean accuracy | mean loss |",
            "|---|---|---|---:|---:|"]
    for name, (words, _) in CANDIDATES.items():
        finals = []
        for framework in ("jax", "torch"):
            for run_dir in sorted(Path(args.root).glob(f"{name}-{framework}-seed*")):
                if not (run_dir / "metrics.jsonl").exists():
                    continue  # still compiling its first epoch
                history = read_metrics(run_dir / "metrics.jsonl")
                config = json.loads((run_dir / "config.json").read_text())
                if len(history) == config["recipe"]["epochs"]:
                    finals.append((run_dir.name.removeprefix(f"{name}-"), history[-1]))
        if finals:
            listed = ", ".join(f"{last.test_accuracy:.2f} ({label})" for label, last in finals)
            accuracy = statistics.mean(last.test_accuracy for _, last in finals)
            loss = statistics.mean(last.test_loss for _, last in finals)
            rows.append(f"| {name} | {words} | {listed} | {accuracy:.2f} | {loss:.4f} |")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train one candidate on the validation split")
    run_parser.add_argument("name", choices=sorted(CANDIDATES))
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
    run_parser.add_argument("--data-dir", default=None)
    run_parser.add_argument("--root", default="runs/search")
    run_parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 to run two candidates at once)")
    report_parser = commands.add_parser("report", help="print the table of finished candidates")
    report_parser.add_argument("--root", default="runs/search")
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
