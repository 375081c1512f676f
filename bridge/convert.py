"""Weights between PyTorch and Flax, both ways: the bridge between torch_ref and jax_impl.

Every PyTorch key maps to one Flax path and one layout change by the rules of bridge.mapping,
the same that `python -m bridge.diff` applies to any model pair; a missing, extra or misshaped
key is an error that names it, never a silent reshape. This package is the
only one that imports both frameworks, so that torch_ref and jax_impl stand side by side on
common and neither imports the other.

    python -m bridge.convert SOURCE DESTINATION

converts a checkpoint or model file of either framework (.pt <-> .msgpack) into a weights file
of the other, which `python -m torch_ref.evaluate` or `python -m jax_impl.evaluate` can read.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import serialization

from bridge.mapping import WeightMap, flatten, weight_map
from common.errors import CheckpointError, UserFacingError
from common.files import atomic_write_bytes
from jax_impl.checkpoints import read_checkpoint
from jax_impl.checkpoints import read_weights as read_flax_weights
from jax_impl.model import Net
from torch_ref.checkpoints import read_weights as read_torch_weights
from torch_ref.model import Net as TorchNet


@functools.cache
def project_map() -> WeightMap:
    """torch_ref's Net paired with jax_impl's, by bridge.mapping's rules (the harness's own)."""
    return weight_map(TorchNet(), reference_shapes())


def reference_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every Flax variable of the model, by (collection, module, variable)."""
    variables = jax.eval_shape(lambda: Net().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False))
    return {path: tuple(leaf.shape) for path, leaf in flatten(variables).items()}


def torch_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict:
    """A PyTorch state_dict (arrays) -> Flax variables {"params": ..., "batch_stats": ...}."""
    return project_map().to_flax(state_dict)


def flax_to_torch(variables: Mapping, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """Flax variables -> a PyTorch state_dict of NumPy arrays (strict=True-loadable by Net)."""
    mapping = project_map()
    state_dict = mapping.to_torch(variables)
    for key in mapping.skipped:
        state_dict[key] = np.asarray(num_batches_tracked, np.int64)
    return state_dict


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
    if os.path.lexists(args.destination):  # unlike Path.exists, never raises: the write names a bad path
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
