"""Weights between PyTorch and Flax, both ways: the bridge between torch_ref and jax_impl.

Every PyTorch key maps to one Flax path and one layout change, in `flax_path`; a missing,
extra or misshaped key is an error that names it, never a silent reshape. This package is the
only one that imports both frameworks, so that torch_ref and jax_impl stand side by side on
common and neither imports the other.

    python -m bridge.convert SOURCE DESTINATION

converts a checkpoint or model file of either framework (.pt <-> .msgpack) into a weights file
of the other, which `python -m torch_ref.evaluate` or `python -m jax_impl.evaluate` can read.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import serialization

from common.errors import CheckpointError, UserFacingError
from common.files import atomic_write_bytes
from jax_impl.checkpoints import read_checkpoint
from jax_impl.checkpoints import read_weights as read_flax_weights
from jax_impl.model import Net
from torch_ref.checkpoints import read_weights as read_torch_weights

CONV_TO_FLAX = (2, 3, 1, 0)  # OIHW -> HWIO
CONV_TO_TORCH = (3, 2, 0, 1)  # HWIO -> OIHW
BATCHNORM_KEYS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                  "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
UNUSED_TORCH_KEY = "num_batches_tracked"  # counts BatchNorm calls; unused with momentum 0.1


class ConversionError(UserFacingError):
    """Weights that do not fit the model; the message names the offending key."""


def flax_path(torch_key: str) -> tuple[str, str, str]:
    """(collection, module, variable) of a PyTorch state_dict key, e.g. conv1.weight ->
    ("params", "conv1", "kernel"); bn1.running_var -> ("batch_stats", "bn1", "var")."""
    module, _, name = torch_key.partition(".")
    if module.startswith("conv") and name == "weight":
        return "params", module, "kernel"
    if module.startswith("bn") and name in BATCHNORM_KEYS:
        collection, variable = BATCHNORM_KEYS[name]
        return collection, module, variable
    raise ConversionError(f"unexpected PyTorch key {torch_key!r}: the model has no such weight")


def reference_shapes() -> dict[tuple[str, str, str], tuple[int, ...]]:
    """Shape of every Flax variable of the model, by (collection, module, variable)."""
    variables = jax.eval_shape(lambda: Net().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False))
    return {(collection, module, name): tuple(leaf.shape)
            for collection, modules in variables.items()
            for module, leaves in modules.items() for name, leaf in leaves.items()}


def torch_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict:
    """A PyTorch state_dict (arrays) -> Flax variables {"params": ..., "batch_stats": ...}."""
    expected = reference_shapes()
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, value in state_dict.items():
        if key.endswith("." + UNUSED_TORCH_KEY):
            if np.asarray(value).shape != ():
                raise ConversionError(f"{key}: expected a scalar count, got shape {np.shape(value)}")
            continue
        path = flax_path(key)
        array = np.asarray(value)
        if path[2] == "kernel":
            if array.ndim != 4:
                raise ConversionError(f"{key}: expected a 4-D OIHW kernel, got shape {array.shape}")
            array = array.transpose(CONV_TO_FLAX)
        if path not in expected:
            raise ConversionError(f"unexpected PyTorch key {key!r}: the model has no such weight")
        if array.shape != expected[path]:
            want = expected[path] if path[2] != "kernel" else tuple(expected[path][i] for i in CONV_TO_TORCH)
            raise ConversionError(f"{key}: shape {np.shape(value)}, the model needs {want}")
        variables[path[0]].setdefault(path[1], {})[path[2]] = array
    missing = [_torch_key(path) for path in expected if path[2] not in variables[path[0]].get(path[1], {})]
    if missing:
        raise ConversionError(f"missing PyTorch key(s): {', '.join(sorted(missing))}")
    return variables


def flax_to_torch(variables: Mapping, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """Flax variables -> a PyTorch state_dict of NumPy arrays (strict=True-loadable by Net)."""
    expected = reference_shapes()
    state_dict: dict[str, np.ndarray] = {}
    for path, shape in expected.items():
        collection, module, name = path
        try:
            array = np.asarray(variables[collection][module][name])
        except KeyError:
            raise ConversionError(f"missing Flax variable {'/'.join(path)}") from None
        if array.shape != shape:
            raise ConversionError(f"Flax variable {'/'.join(path)}: shape {array.shape}, the model needs {shape}")
        state_dict[_torch_key(path)] = array.transpose(CONV_TO_TORCH) if name == "kernel" else array
    extra = [f"{c}/{m}/{n}" for c, modules in variables.items() for m, leaves in modules.items()
             for n in leaves if (c, m, n) not in expected]
    if extra:
        raise ConversionError(f"unexpected Flax variable(s): {', '.join(extra)}")
    for module in sorted({m for _, m, _ in expected if m.startswith("bn")}):
        state_dict[f"{module}.{UNUSED_TORCH_KEY}"] = np.asarray(num_batches_tracked, np.int64)
    return state_dict


def _torch_key(path: tuple[str, str, str]) -> str:
    collection, module, name = path
    if name == "kernel":
        return f"{module}.weight"
    return next(f"{module}.{key}" for key, target in BATCHNORM_KEYS.items() if target == (collection, name))


def write_torch_weights(path: Path, state_dict: Mapping[str, np.ndarray]) -> None:
    """A PyTorch state_dict file (tensors only, loadable with weights_only=True)."""
    buffer = io.BytesIO()
    torch.save({key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_flax_weights(path: Path, variables: Mapping) -> None:
    """A model.msgpack like the one `--save-model` writes."""
    weights = {"params": dict(variables["params"]), "batch_stats": dict(variables["batch_stats"])}
    atomic_write_bytes(path, serialization.msgpack_serialize(weights))


def convert_file(source: Path, destination: Path) -> str:
    """Convert between .pt and .msgpack files; returns a one-line description."""
    kinds = (source.suffix, destination.suffix)
    if kinds == (".pt", ".msgpack"):
        state_dict = {key: value.cpu().numpy() for key, value in read_torch_weights(source).items()}
        write_flax_weights(destination, torch_to_flax(state_dict))
    elif kinds == (".msgpack", ".pt"):
        steps = _training_steps(source)
        write_torch_weights(destination, flax_to_torch(read_flax_weights(source), num_batches_tracked=steps))
    else:
        raise UserFacingError(f"convert .pt -> .msgpack or .msgpack -> .pt, not {kinds[0]} -> {kinds[1]}")
    return f"converted {source} -> {destination}"


def _training_steps(path: Path) -> int:
    """Steps trained, for PyTorch's num_batches_tracked: known for a training checkpoint only."""
    try:
        return int(read_checkpoint(path)[1]["state"]["step"])
    except CheckpointError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.convert",
        description="Convert a checkpoint or model file between torch_ref (.pt) and jax_impl (.msgpack).")
    parser.add_argument("source", type=Path, help="checkpoint.pt, model.pt, checkpoint.msgpack or model.msgpack")
    parser.add_argument("destination", type=Path, help="the weights file to write, of the other framework")
    args = parser.parse_args(argv)
    if args.destination.exists():
        print(f"error: {args.destination} exists; choose another name (nothing was overwritten)", file=sys.stderr)
        return 2
    try:
        print(convert_file(args.source, args.destination))
    except UserFacingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
