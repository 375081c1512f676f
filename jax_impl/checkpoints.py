"""JAX checkpoints and weights files: msgpack (flax.serialization).

msgpack holds plain arrays and strings, so loading one can never execute code, unlike a
pickle. orbax is the ecosystem's checkpointer and the better fit for sharded states across
hosts; this state is 4,328 weights plus their momentum, written whole by one process, and
msgpack keeps each checkpoint a single file that the SHA-256 check of common.checkpoints
covers and that `python -m bridge.convert` reads without orbax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from common.checkpoints import checkpoint_meta, sealed_meta, unreadable
from common.errors import CheckpointError
from common.settings import FrameworkNames

NAMES = FrameworkNames(name="jax", title="JAX", checkpoint_name="checkpoint.msgpack", model_name="model.msgpack")
CHECKPOINT_KEYS = {"meta", "state"}


def checkpoint_bytes(state: Any, meta: dict) -> bytes:
    """One seed's whole training state and `meta`, as msgpack. The digest is taken over the
    contents as msgpack gives them back (NumPy arrays), so that loading can recompute it."""
    contents = {"state": serialization.msgpack_restore(serialization.msgpack_serialize(
        serialization.to_state_dict(jax.device_get(state))))}
    return serialization.msgpack_serialize({"meta": sealed_meta(meta, contents), **contents})


def model_bytes(variables: dict) -> bytes:
    """Variables {"params", "batch_stats"} alone, for --save-model."""
    return serialization.msgpack_serialize(serialization.to_state_dict(jax.device_get(variables)))


def restore(state: Any, payload: dict) -> Any:
    """`state` (a TrainState) continued from a checkpoint's payload (`read_checkpoint`), as
    NumPy arrays: the JAX way, a new state rather than a changed one."""
    saved = dict(payload["state"])
    saved.setdefault("averaged", None)  # a checkpoint without the field keeps no average
    return restored(jax.device_get(state), saved, "the checkpoint")


def restored(template: Any, saved: dict, what: str) -> Any:
    """`saved` (a state dict) in the structure of `template`, every shape checked; `what` names
    it in errors ("the checkpoint", "the weights file")."""
    try:
        tree = serialization.from_state_dict(template, saved)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{what} does not fit this model and recipe: {error}") from error
    wanted, found = jax.tree_util.tree_leaves_with_path(template), jax.tree_util.tree_leaves_with_path(tree)
    if len(wanted) != len(found):  # e.g. weights averaged in the file, none in this recipe (from_state_dict keeps them)
        raise CheckpointError(f"{what} does not fit this model and recipe: it holds {len(found)} arrays, "
                              f"the recipe's state {len(wanted)} (a run with weight averaging against one without?)")
    for (path, want), (_, got) in zip(wanted, found, strict=True):
        if np.shape(want) != np.shape(got):
            raise CheckpointError(f"{what} does not fit the model: {jax.tree_util.keystr(path)} has shape "
                                  f"{np.shape(got)}, the model needs {np.shape(want)}")
    return tree


def _load(path: Path) -> object:
    """msgpack_restore: plain arrays and strings only, so loading never executes code."""
    try:
        return serialization.msgpack_restore(Path(path).read_bytes())
    except Exception as error:  # msgpack raises several types for truncated or foreign files
        raise unreadable(path, "JAX", error) from error


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(meta, payload) of a training checkpoint; payload["state"] is the saved TrainState."""
    payload = _load(path)
    return checkpoint_meta(payload, path, "jax", "jax_impl", CHECKPOINT_KEYS), payload


def read_weights(path: Path) -> dict:
    """Variables {"params", "batch_stats"} from a training checkpoint (checkpoint.msgpack: the
    averaged ones, where its recipe keeps an average) or a weights file (model.msgpack from
    --save-model, or a converted PyTorch model)."""
    payload = _load(path)
    if isinstance(payload, dict) and "meta" in payload:  # a training checkpoint: check its digest too
        checkpoint_meta(payload, path, "jax", "jax_impl", CHECKPOINT_KEYS)
    if isinstance(payload, dict) and "state" in payload:
        payload = _evaluated_state(payload["state"])
    if not isinstance(payload, dict) or not {"params", "batch_stats"} <= set(payload):
        raise CheckpointError(f"{path} holds neither a jax_impl checkpoint nor model weights")
    return {"params": payload["params"], "batch_stats": payload["batch_stats"]}


def _evaluated_state(state: dict) -> dict:
    """A saved TrainState's variables as evaluation sees them (training.evaluated_variables_of)."""
    averaged = state.get("averaged")
    if isinstance(averaged, dict) and int(averaged.get("count", 0)) > 0:
        return averaged["variables"]
    return state
