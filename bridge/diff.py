"""Prove a PyTorch model and its Flax port equal layer by layer, or name the first layer where
they part, at which stage, by how much, and which classic porting mistake it looks like.

    python -m bridge.diff TORCH FLAX --input-shape C,H,W [--batch 8] [--dtype float64|float32]
                          [--seed 0] [--map FILE] [--json FILE]

TORCH and FLAX are `package.module:callable`, each a callable of no arguments returning the model
(a torch.nn.Module; a Flax linen module, called as `module.apply(variables, x, train=...)` on
channels-last input, or a Flax NNX module, switched by `model.train()` / `model.eval()` and
called as `model(x)`; bridge.nnx_side). The same as a library, for a porter's own tests:

    report = bridge.diff.compare(torch_model, flax_module, input_shape=(1, 28, 28))
    assert report.equal, report.first_divergence

The checks, in order: forward-eval (every layer's output, running statistics used),
forward-train (batch statistics, the same dropout masks on both sides), running-stats (after
that training-mode forward), gradients (of a fixed scalar of the output, every parameter) and
step (every parameter after one SGD step with momentum: torch.optim.SGD against optax.sgd).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn
from flax import nnx

from bridge import nnx_side
from bridge.capture import DropoutDraws, channels_last
from bridge.hints import hint
from bridge.mapping import MappingError, flatten, read_overrides, weight_map
from bridge.report import TOLERANCES, Check, Report
from bridge.stages import OUTPUT, Subjects, precision, randomised_statistics, run_stages
from common.errors import UserFacingError

DTYPES = {"float64": (torch.float64, jnp.float64), "float32": (torch.float32, jnp.float32)}


def compare(torch_model: torch.nn.Module, flax_module: nn.Module | nnx.Module, input_shape: Sequence[int], *,
            batch: int = 8, dtype: str = "float64", seed: int = 0, overrides: Mapping[str, str] | None = None,
            mode: tuple[str, bool] = ("train", True), tolerance: float | None = None) -> Report:
    """Compare `torch_model` (left unchanged: a copy is used) with `flax_module` on `batch` random
    inputs of `input_shape` (PyTorch's layout, without the batch). `mode` is the Flax keyword that
    switches training and its value in training: ("train", True), ("deterministic", False)."""
    if dtype not in DTYPES:
        raise UserFacingError(f"dtype {dtype!r}: choose float64 or float32")
    model = copy.deepcopy(torch_model).to(DTYPES[dtype][0])
    randomised_statistics(model, seed)
    images = np.random.default_rng(seed).standard_normal((batch, *input_shape))
    try:
        with torch.no_grad():
            model.eval()(torch.as_tensor(images, dtype=DTYPES[dtype][0]))
    except Exception as error:  # the user's model: whatever it raises, the input does not suit it
        raise UserFacingError(f"the PyTorch model cannot run on inputs of shape {images.shape} "
                              f"({type(error).__name__}: {error}); check --input-shape") from None
    keyword, in_training = mode
    report = Report(dtype)
    contexts: dict = {}
    with precision(dtype):
        flax_input = jnp.asarray(channels_last(images), DTYPES[dtype][1])
        try:
            shapes = nnx_side.variables_of(flax_module) if nnx_side.is_nnx(flax_module) else jax.eval_shape(
                lambda: flax_module.init({"params": jax.random.key(seed), "dropout": jax.random.key(0)},
                                         flax_input, **{keyword: not in_training}))
        except Exception as error:  # the user's module: any error it raises means the same to them
            raise UserFacingError(f"the Flax module cannot be initialised on inputs of shape {flax_input.shape} "
                                  f"with {keyword}={not in_training} ({type(error).__name__}: {error}); check "
                                  "--input-shape and --mode") from None
        mapping = weight_map(model, {path: tuple(leaf.shape) for path, leaf in flatten(shapes).items()}, overrides)
        state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, DTYPES[dtype][1]),
                                           mapping.to_flax({k: v.numpy() for k, v in state.items()}))
        side = Subjects(model, flax_module, mapping, variables, state, images,
                     lambda train: {keyword: in_training if train else not in_training}, DTYPES[dtype],
                     TOLERANCES[dtype] if tolerance is None else tolerance, DropoutDraws(seed))
        report.notes.append("dropout: the same masks injected into both sides' standard dropout layers "
                            "(torch.nn.Dropout/Dropout1d/2d/3d, flax.linen.Dropout, flax.nnx.Dropout and subclasses)")
        if dtype == "float32":
            report.notes.append("float32: a gradient may part at a kink (a ReLU input or max-pool tie within "
                                "rounding of its threshold) or by BatchNorm's cancellation; float64 proves equality")
        try:
            run_stages(side, report, contexts)
        except Exception as error:  # a port that cannot even run: the stage it stopped in is the divergence
            report.checks.append(Check(side.stage, OUTPUT, OUTPUT, float("inf"), side.tolerance, False,
                                       f"{type(error).__name__}: {error}"))
    first = next((check for check in report.checks if not check.ok), None)
    if first is not None:
        context = contexts.get((first.stage, first.torch))
        report.first_divergence = {"stage": first.stage, "torch": first.torch, "flax": first.flax, "rel": first.rel,
                                   "tolerance": first.tolerance, "hint": hint(context) if context else None,
                                   "note": first.note}
    return report


def load_callable(spec: str) -> Callable:
    """`package.module:callable` -> the callable."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserFacingError(f"{spec!r}: write package.module:callable, for example torch_ref.model:Net")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise UserFacingError(f"cannot import {module_name} ({error}); run from the directory that holds it") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UserFacingError(f"{module_name} has no {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise UserFacingError(f"{spec} is not callable")
    return target


def build(spec: str) -> object:
    """Call the `package.module:callable` that builds a model."""
    factory = load_callable(spec)
    try:
        return factory()
    except Exception as error:  # the user's code: whatever it raises, the fix is theirs
        raise UserFacingError(f"{spec}() raised {type(error).__name__}: {error}") from None


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write the input shape without the batch, e.g. 1,28,28") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be a positive integer")
    return shape


def _mode(text: str) -> tuple[str, bool]:
    keyword, _, value = text.partition("=")
    if not keyword.isidentifier() or value.lower() not in {"true", "false"}:
        raise argparse.ArgumentTypeError(f"{text!r}: write KEYWORD=VALUE-IN-TRAINING, e.g. train=true or "
                                         "deterministic=false")
    return keyword, value.lower() == "true"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive integer")
    return int(text)


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="python -m bridge.diff",
        description="Compare a PyTorch model with its Flax port layer by layer: forward in eval and train mode, "
                    "BatchNorm running statistics, gradients and one SGD step. Exit 0: equal within tolerance; "
                    "1: they part (the first divergence is named, with a hint); 2: usage error or unmappable weights.")
    result.add_argument("torch", metavar="TORCH", help="package.module:callable returning a torch.nn.Module")
    result.add_argument("flax", metavar="FLAX", help="package.module:callable returning a Flax module: linen, or NNX "
                                                     "(switched with .train() / .eval(); --mode is then unused)")
    result.add_argument("--input-shape", type=_input_shape, required=True,
                        help="one input's shape in PyTorch's layout, without the batch: C,H,W (4-D inputs reach "
                             "Flax as N,H,W,C)")
    result.add_argument("--batch", type=_positive, default=8, help="inputs per check (default 8)")
    result.add_argument("--dtype", choices=tuple(DTYPES), default="float64",
                        help="float64 (default) shows a port's mistakes apart from rounding; float32 what users run")
    result.add_argument("--seed", type=int, default=0, help="seeds the PyTorch weights, the inputs and the masks")
    result.add_argument("--map", type=Path, metavar="FILE",
                        help='JSON {"torch.key": "flax/path"} for weights the name rules do not pair')
    result.add_argument("--json", type=Path, metavar="FILE", help="write every check and the verdict as JSON")
    result.add_argument("--mode", type=_mode, default=("train", True), metavar="KEYWORD=VALUE",
                        help="the Flax __call__ keyword that switches training and its value in training "
                             "(default train=true; e.g. deterministic=false, use_running_average=false)")
    result.add_argument("--tolerance", type=float, help="largest relative difference accepted "
                                                         "(default: 1e-10 in float64, 1e-5 in float32)")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        overrides = read_overrides(args.map) if args.map else None
        torch.manual_seed(args.seed)
        torch_model, flax_module = build(args.torch), build(args.flax)
        if not isinstance(torch_model, torch.nn.Module) or not isinstance(flax_module, nn.Module | nnx.Module):
            raise UserFacingError(f"{args.torch} must return a torch.nn.Module and {args.flax} a Flax module (linen "
                                  "or NNX); "
                                  f"got {type(torch_model).__name__} and {type(flax_module).__name__}")
        report = compare(torch_model, flax_module, args.input_shape, batch=args.batch, dtype=args.dtype,
                         seed=args.seed, overrides=overrides, mode=args.mode, tolerance=args.tolerance)
    except (UserFacingError, MappingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.json:
        try:
            args.json.write_text(json.dumps(report.to_json(), indent=1, allow_nan=False) + "\n")
        except OSError as error:
            print(f"error: cannot write --json {args.json}: {error.strerror or error}", file=sys.stderr)
            return 2
    return 0 if report.equal else 1


if __name__ == "__main__":
    sys.exit(main())
