"""Which Flax variable each PyTorch weight becomes, and how its axes move: for any model pair.

A PyTorch key names a module path and a variable (`features.0.weight`); the Flax variable is
found by name (`features_0/kernel` or `features/layers_0/kernel`, as linen names the children of
a list or an `nn.Sequential`) and its layout follows from the kind of PyTorch module that owns
it: convolution kernels OIHW -> HWIO, linear weights (out, in) -> (in, out), BatchNorm's
weight/bias/running_mean/running_var -> scale/bias/mean/var. A JSON file of
`{"torch.key": "flax/path"}` overrides any guess. Nothing is reshaped silently: a key that maps
nowhere, two keys on one variable, a Flax variable no key fills, or a shape that does not fit
after the layout change is an error naming the keys on both sides.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserFacingError

SKIPPED_TORCH_VARIABLES = ("num_batches_tracked",)  # BatchNorm's call counter: no Flax twin, unused with a momentum
CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
NORMALISATIONS = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
RUNNING_STATISTICS = {"running_mean": "mean", "running_var": "var"}


class MappingError(UserFacingError):
    """Weights that cannot be paired; the message names the keys on both sides."""


def kernel_axes(ndim: int) -> tuple[int, ...]:
    """PyTorch's (out, in, *window) kernel -> Flax's (*window, in, out)."""
    return (*range(2, ndim), 1, 0)


@dataclass(frozen=True)
class Pair:
    """One PyTorch tensor and the Flax variable it becomes."""

    torch_key: str
    flax_path: tuple[str, ...]  # (collection, *modules, variable)
    axes: tuple[int, ...] | None  # the transpose from PyTorch's layout to Flax's; None: the same layout
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]

    @property
    def flax_name(self) -> str:
        """The path without its collection, joined with '/' (how --map and reports write it)."""
        return "/".join(self.flax_path[1:])

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        if array.shape != self.torch_shape:
            raise MappingError(f"{self.torch_key}: shape {array.shape}, the model needs {self.torch_shape}")
        return array if self.axes is None else array.transpose(self.axes)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if array.shape != self.flax_shape:
            raise MappingError(f"Flax variable {'/'.join(self.flax_path)}: shape {array.shape}, "
                               f"the model needs {self.flax_shape}")
        return array if self.axes is None else array.transpose(tuple(np.argsort(self.axes)))


@dataclass(frozen=True)
class WeightMap:
    """Every PyTorch tensor of a model with its Flax variable, in the PyTorch state_dict's order."""

    pairs: tuple[Pair, ...]
    skipped: tuple[str, ...]  # PyTorch keys with no Flax twin (num_batches_tracked)

    def to_flax(self, state_dict: Mapping[str, np.ndarray]) -> dict:
        """PyTorch tensors (as arrays) -> nested Flax variables {"params": ..., "batch_stats": ...}."""
        known = {pair.torch_key for pair in self.pairs} | set(self.skipped)
        unexpected = sorted(set(state_dict) - known)
        if unexpected:
            raise MappingError(f"unexpected PyTorch key(s) {', '.join(map(repr, unexpected))}: "
                               "the model has no such weight")
        for key in self.skipped:
            if key in state_dict and np.shape(state_dict[key]) != ():
                raise MappingError(f"{key}: expected a scalar count, got shape {np.shape(state_dict[key])}")
        missing = [pair.torch_key for pair in self.pairs if pair.torch_key not in state_dict]
        if missing:
            raise MappingError(f"missing PyTorch key(s): {', '.join(sorted(missing))}")
        variables: dict = {}
        for pair in self.pairs:
            *parents, name = pair.flax_path
            node = variables
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = pair.to_flax(np.asarray(state_dict[pair.torch_key]))
        return variables

    def to_torch(self, variables: Mapping) -> dict[str, np.ndarray]:
        """Nested Flax variables -> PyTorch tensors as arrays (without the skipped keys)."""
        leaves = flatten(variables)
        extra = sorted("/".join(path) for path in set(leaves) - {pair.flax_path for pair in self.pairs})
        if extra:
            raise MappingError(f"unexpected Flax variable(s): {', '.join(extra)}")
        state_dict = {}
        for pair in self.pairs:
            if pair.flax_path not in leaves:
                raise MappingError(f"missing Flax variable {'/'.join(pair.flax_path)}")
            state_dict[pair.torch_key] = pair.to_torch(np.asarray(leaves[pair.flax_path]))
        return state_dict

    def flax_module(self, torch_module: str) -> tuple[str, ...] | None:
        """The Flax module path whose variables come from this PyTorch module's, if any."""
        for pair in self.pairs:
            if pair.torch_key.rpartition(".")[0] == torch_module:
                return pair.flax_path[1:-1]
        return None


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """{(collection, *modules, variable): leaf} of nested Flax variables."""
    leaves: dict[tuple[str, ...], object] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            leaves.update(flatten(value, (*prefix, str(key))))
        else:
            leaves[(*prefix, str(key))] = value
    return leaves


def flax_module_candidates(torch_module: str) -> list[tuple[str, ...]]:
    """Flax module paths a PyTorch module path may have become: each index of a list or
    Sequential (`features.0`) as linen names it, `features_0` (a list attribute) or
    `features/layers_0` (an nn.Sequential attribute); a leading index is a Sequential root's."""
    if not torch_module:
        return [()]
    options: list[list[tuple[str, ...]]] = []
    for index, part in enumerate(torch_module.split(".")):
        if part.isdigit():
            options.append([("_", part), (f"layers_{part}",)] if index else [(f"layers_{part}",)])
        else:
            options.append([(part,)])
    candidates = []
    for choice in itertools.product(*options):
        path: list[str] = []
        for piece in choice:
            if piece[0] == "_":
                path[-1] = f"{path[-1]}_{piece[1]}"
            else:
                path.append(piece[0])
        candidates.append(tuple(path))
    return candidates


def _variable_names(module: torch.nn.Module, name: str) -> tuple[tuple[str, str], ...]:
    """(collection, Flax variable name) candidates for one PyTorch variable of `module`."""
    if name in RUNNING_STATISTICS:
        return (("batch_stats", RUNNING_STATISTICS[name]),)
    if name == "weight":
        if isinstance(module, NORMALISATIONS):
            return (("params", "scale"),)
        if isinstance(module, torch.nn.Embedding):
            return (("params", "embedding"),)
        return (("params", "kernel"), ("params", "scale"), ("params", "embedding"), ("params", "weight"))
    return (("params", name),)


def _axes(module: torch.nn.Module, name: str, ndim: int) -> tuple[int, ...] | None:
    if name != "weight":
        return None
    if isinstance(module, CONVOLUTIONS):
        return kernel_axes(ndim)
    if isinstance(module, torch.nn.Linear):
        return (1, 0)
    return None


def _describe_layout(axes: tuple[int, ...] | None, ndim: int) -> str:
    if axes is None:
        return "its layout unchanged"
    if ndim == 2:
        return "transposed (out, in) -> (in, out)"
    return f"axes {tuple(range(ndim))} -> {axes}"


def read_overrides(path: Path) -> dict[str, str]:
    """A --map file: {"torch.key": "flax/path", ...}."""
    try:
        overrides = json.loads(path.read_text())
    except OSError as error:
        raise MappingError(f"cannot read --map {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise MappingError(f"--map {path} is not JSON ({error}): write {{\"torch.key\": \"flax/path\"}}") from None
    if not isinstance(overrides, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in overrides.items()):
        raise MappingError(f'--map {path} must be one JSON object of strings: {{"torch.key": "flax/path"}}')
    return overrides


def _resolve_override(key: str, target: str, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> tuple[str, ...]:
    parts = tuple(target.strip("/").split("/"))
    if parts in shapes:
        return parts
    found = [path for path in shapes if path[1:] == parts]
    if len(found) != 1:
        raise MappingError(f"--map: PyTorch key {key} -> Flax {target}, which the Flax model "
                           f"{'has in several collections' if found else 'does not have'}")
    return found[0]


def weight_map(torch_model: torch.nn.Module, flax_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
               overrides: Mapping[str, str] | None = None) -> WeightMap:
    """Pair every tensor of `torch_model`'s state_dict with one Flax variable of `flax_shapes`
    ({(collection, *modules, variable): shape}), checking every shape after its layout change."""
    overrides = dict(overrides or {})
    state_dict = torch_model.state_dict()
    unknown = sorted(set(overrides) - set(state_dict))
    if unknown:
        raise MappingError(f"--map names PyTorch key(s) the model does not have: {', '.join(unknown)}")
    pairs, skipped, taken = [], [], {}
    for key, tensor in state_dict.items():
        module_path, _, name = key.rpartition(".")
        if name in SKIPPED_TORCH_VARIABLES and key not in overrides:
            skipped.append(key)
            continue
        module = torch_model.get_submodule(module_path)
        if key in overrides:
            path = _resolve_override(key, overrides[key], flax_shapes)
        else:
            tried = [(collection, *modules, variable) for collection, variable in _variable_names(module, name)
                     for modules in flax_module_candidates(module_path)]
            found = [path for path in tried if path in flax_shapes]
            if len(found) != 1:
                names = ", ".join("/".join(path[1:]) for path in (found or tried))
                problem = "several Flax variables fit" if found else "maps to no Flax variable"
                raise MappingError(f"PyTorch key {key} {problem} (tried {names}); pair it in a --map "
                                   f"file. Flax variables without a PyTorch key: {_unpaired(flax_shapes, taken)}")
            path = found[0]
        if path in taken:
            raise MappingError(f"PyTorch keys {taken[path]} and {key} both map to Flax {'/'.join(path[1:])}")
        axes = _axes(module, name, tensor.ndim)
        converted = tuple(tensor.shape[axis] for axis in axes) if axes else tuple(tensor.shape)
        if converted != tuple(flax_shapes[path]):
            raise MappingError(f"PyTorch key {key} {tuple(tensor.shape)}, {_describe_layout(axes, tensor.ndim)}, "
                               f"is {converted}; Flax {'/'.join(path[1:])} is {tuple(flax_shapes[path])}")
        taken[path] = key
        pairs.append(Pair(key, path, axes, tuple(tensor.shape), converted))
    if len(taken) != len(flax_shapes):
        raise MappingError(f"Flax variable(s) no PyTorch key maps to: {_unpaired(flax_shapes, taken)}; "
                           "pair them in a --map file")
    return WeightMap(tuple(pairs), tuple(skipped))


def _unpaired(flax_shapes: Mapping[tuple[str, ...], tuple[int, ...]], taken: Mapping) -> str:
    return ", ".join("/".join(path[1:]) for path in flax_shapes if path not in taken) or "none"
