"""JAX's side of the training driver: state, compiled epochs, evaluation and checkpoints.

Checkpoints are msgpack (flax.serialization): plain arrays and strings, so loading one can
never execute code, unlike a pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import optax
from flax import serialization

from common.batching import EpochPlan
from common.errors import CheckpointError, UserFacingError
from common.progress import EpochProgress
from common.training import TrainerConfig
from jax_impl.epochs import EPOCH_RUNNERS, AheadOfTime, default_epoch_runner
from jax_impl.fast_ops import weight_grad_chunk_for
from jax_impl.schedules import learning_rate_schedule
from jax_impl.steps import create_train_state, eval_step

CHECKPOINT_KEYS = {"meta", "state"}


def limit_threads(threads: int | None) -> None:
    """--threads: pin the process to that many cores. XLA sizes its CPU thread pool from the
    cores the process may use when the backend starts, so this must run before first use."""
    if threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def select_device(choice: str) -> jax.Device:
    """--device: auto -> JAX's default backend (a GPU or TPU when present), cpu, or gpu."""
    if choice == "cpu":
        return jax.devices("cpu")[0]
    if choice == "auto":
        return jax.devices()[0]
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        raise UserFacingError("--device gpu: JAX sees no GPU here (is jax[cuda] installed?); "
                              "use --device cpu or auto.") from None


class JaxTrainer:
    """Train state of one run, seeded by `seed`, with the epoch loop suited to its device."""

    def __init__(self, config: TrainerConfig):
        limit_threads(config.threads)
        self.device = select_device(config.device)
        init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
        self.dropout_key = jax.device_put(dropout_key, self.device)
        self.schedule = learning_rate_schedule(config.recipe, config.steps_per_epoch)
        state = create_train_state(init_key, config.recipe, config.steps_per_epoch,
                                   weight_grad_chunk_for(self.device.platform))
        self.state = jax.device_put(state, self.device)
        self.epoch_runner = EPOCH_RUNNERS[default_epoch_runner(self.device)](self.device)
        self.evaluate = AheadOfTime(jax.jit(eval_step))

    def describe(self) -> dict[str, Any]:
        return {"framework": "JAX", "version": jax.__version__, "flax": flax.__version__,
                "optax": optax.__version__, "device": str(self.device), "epoch": self.epoch_runner.name,
                "threads": len(os.sched_getaffinity(0))}

    def learning_rate(self) -> float:
        return float(self.schedule(int(self.state.step)))

    def compile_seconds(self) -> float:
        return self.epoch_runner.step.compile_seconds + self.evaluate.compile_seconds

    def train_epoch(self, plan: EpochPlan, images: np.ndarray, labels: np.ndarray, progress: EpochProgress) -> None:
        self.state = self.epoch_runner(self.state, self.dropout_key, plan, images, labels, progress)

    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        outputs = []
        for start in range(0, len(images), batch_size):
            inputs = jax.device_put(images[start : start + batch_size, ..., None], self.device)
            outputs.append(self.evaluate(len(inputs), self.state, inputs))
        return np.concatenate([np.asarray(out) for out in outputs])

    def checkpoint_bytes(self, meta: dict) -> bytes:
        state = serialization.to_state_dict(jax.device_get(self.state))
        return serialization.msgpack_serialize({"meta": json.dumps(meta), "state": state})

    def restore(self, state: dict) -> None:
        try:
            restored = serialization.from_state_dict(self.state, state["state"])
        except (KeyError, ValueError, TypeError) as error:
            raise CheckpointError(f"the checkpoint's state does not fit this model and recipe: {error}") from error
        self.state = jax.device_put(restored, self.device)

    def model_bytes(self) -> bytes:
        weights = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        return serialization.msgpack_serialize(serialization.to_state_dict(jax.device_get(weights)))

    def load_weights(self, variables: dict) -> None:
        """Replace the weights (for evaluation) by variables {"params", "batch_stats"} of this model."""
        current = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        try:
            restored = serialization.from_state_dict(current, variables)
        except (KeyError, ValueError, TypeError) as error:
            raise CheckpointError(f"the weights do not fit the model: {error}") from error
        _check_shapes(current, restored)
        self.state = self.state.replace(**jax.device_put(restored, self.device))


def _check_shapes(expected: dict, given: dict) -> None:
    for (path, want), (_, got) in zip(jax.tree_util.tree_leaves_with_path(expected),
                                      jax.tree_util.tree_leaves_with_path(given), strict=True):
        if np.shape(want) != np.shape(got):
            raise CheckpointError(f"the weights do not fit the model: {jax.tree_util.keystr(path)} has shape "
                                  f"{np.shape(got)}, the model needs {np.shape(want)}")


def _load(path: Path) -> object:
    """msgpack_restore: plain arrays and strings only, so loading never executes code."""
    try:
        return serialization.msgpack_restore(Path(path).read_bytes())
    except Exception as error:  # msgpack raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path} cannot be read as a JAX checkpoint ({type(error).__name__}: {error}). It may be "
            "truncated or not a file of this project; it was not modified."
        ) from error


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(meta, state) of a checkpoint written by JaxTrainer."""
    payload = _load(path)
    if not isinstance(payload, dict) or not CHECKPOINT_KEYS <= set(payload):
        raise CheckpointError(f"{path} is not a jax_impl training checkpoint (expected keys "
                              f"{sorted(CHECKPOINT_KEYS)}); it was not modified.")
    meta = json.loads(payload["meta"])
    if meta.get("framework") != "jax":
        raise CheckpointError(f"{path} was written by {meta.get('framework')!r}, not by jax_impl.")
    return meta, payload


def read_weights(path: Path) -> dict:
    """Variables {"params", "batch_stats"} from a training checkpoint (checkpoint.msgpack) or a
    weights file (model.msgpack from --save-model, or a converted PyTorch model)."""
    payload = _load(path)
    if isinstance(payload, dict) and "state" in payload:
        payload = payload["state"]
    if not isinstance(payload, dict) or not {"params", "batch_stats"} <= set(payload):
        raise CheckpointError(f"{path} holds neither a jax_impl checkpoint nor model weights")
    return {"params": payload["params"], "batch_stats": payload["batch_stats"]}
