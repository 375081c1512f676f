"""Flax NNX checkpoints and weights files: msgpack (flax.serialization), as the linen twin's.

An NNX run's state is two or three objects, the model, its optimiser and the recipe's weight
average; a checkpoint holds them as plain arrays (`nnx.to_pure_dict`): the model's variables in
the linen twin's very trees, the optimiser's step and optax state, and the average's count and
variables (the linen twin's `WeightAverage` fields). Loading never runs code, and the SHA-256 of
common.checkpoints covers every array.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx, serialization

from common.checkpoints import checkpoint_meta, sealed_meta, unreadable
from common.errors import CheckpointError
from common.settings import FrameworkNames
from jax_impl.checkpoints import read_weights as read_linen_weights
from nnx_impl.averaging import AveragedModel
from nnx_impl.model import Net, load_variables, variables_of

NAMES = FrameworkNames(name="nnx", title="Flax NNX", checkpoint_name="checkpoint.msgpack", model_name="model.msgpack")
CHECKPOINT_KEYS = {"meta", "state"}


def training_state(model: Net, optimizer: nnx.Optimizer, averaged: AveragedModel | None = None) -> dict:
    """The whole training state as plain arrays: {"variables", "optimizer"} and, where the recipe
    keeps an average, "averaged": {"count", "variables"}."""
    state = {"variables": variables_of(model), "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}
    if averaged is not None:
        state["averaged"] = {"count": averaged.n_averaged[...], "variables": variables_of(averaged.module)}
    return jax.device_get(state)


def checkpoint_bytes(model: Net, optimizer: nnx.Optimizer, averaged: AveragedModel | None, meta: dict) -> bytes:
    """The model, its optimiser, its average and `meta`, as msgpack. The digest is taken over the
    contents as msgpack gives them back (NumPy arrays), so that loading can recompute it."""
    contents = {"state": serialization.msgpack_restore(serialization.msgpack_serialize(
        training_state(model, optimizer, averaged)))}
    return serialization.msgpack_serialize({"meta": sealed_meta(meta, contents), **contents})


def model_bytes(model: Net) -> bytes:
    """The model's variables {"params", "batch_stats"} alone, for --save-model: the linen twin's file."""
    return serialization.msgpack_serialize(jax.device_get(variables_of(model)))


def restore(model: Net, optimizer: nnx.Optimizer, averaged: AveragedModel | None, payload: dict) -> None:
    """Continue `model`, `optimizer` and `averaged` in place from a checkpoint's payload
    (`read_checkpoint`), every name and shape checked first, so that a checkpoint that does not
    fit changes nothing."""
    saved = payload["state"]
    expected = training_state(model, optimizer, averaged)
    check_fits(expected, saved, "the checkpoint")
    if averaged is None and "averaged" in saved:
        raise CheckpointError("the checkpoint keeps a weight average that this recipe does not")
    load_variables(model, saved["variables"])
    state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(np.asarray, saved["optimizer"]))
    nnx.update(optimizer, state)
    if averaged is not None:
        load_variables(averaged.module, saved["averaged"]["variables"])
        averaged.n_averaged[...] = np.asarray(saved["averaged"]["count"])


def check_fits(expected: dict, saved: object, what: str, path: str = "") -> None:
    """Every key of `expected` in `saved`, with the same shape; the first misfit named."""
    if isinstance(expected, dict):
        if not isinstance(saved, dict):
            raise CheckpointError(f"{what} does not fit this model and recipe: {path or 'its state'} is not a tree")
        for key, value in expected.items():
            if key not in saved:
                raise CheckpointError(f"{what} does not fit this model and recipe: {path}/{key} is missing")
            check_fits(value, saved[key], what, f"{path}/{key}")
    elif np.shape(expected) != np.shape(saved):
        raise CheckpointError(f"{what} does not fit the model: {path} has shape {np.shape(saved)}, the model needs "
                              f"{np.shape(expected)}")


def _load(path: Path) -> object:
    """msgpack_restore: plain arrays and strings only, so loading never executes code."""
    try:
        return serialization.msgpack_restore(Path(path).read_bytes())
    except Exception as error:  # msgpack raises several types for truncated or foreign files
        raise unreadable(path, NAMES.title, error) from error


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(meta, payload) of a training checkpoint; payload["state"] is `training_state`'s tree."""
    payload = _load(path)
    return checkpoint_meta(payload, path, NAMES.name, "nnx_impl", CHECKPOINT_KEYS), payload


def read_weights(path: Path) -> dict:
    """Variables {"params", "batch_stats"} from an NNX checkpoint (the averaged ones, where its
    recipe keeps an average), or from anything the linen twin
    reads (its checkpoints, --save-model files, a converted PyTorch model): the trees are the same."""
    payload = _load(path)
    if isinstance(payload, dict) and "meta" in payload and _framework_of(payload) == NAMES.name:
        checkpoint_meta(payload, path, NAMES.name, "nnx_impl", CHECKPOINT_KEYS)
        averaged = payload["state"].get("averaged")
        return averaged["variables"] if averaged and int(averaged["count"]) > 0 else payload["state"]["variables"]
    return read_linen_weights(path)


def _framework_of(payload: dict) -> str | None:
    try:
        return json.loads(payload["meta"]).get("framework")
    except (TypeError, ValueError, AttributeError):
        return None  # damaged metadata: the linen reader names the problem
