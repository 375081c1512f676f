"""JAX's side of the training driver: state, compiled epochs, evaluation and checkpoints.

Checkpoints are msgpack (flax.serialization): plain arrays and strings, so loading one can
never execute code, unlike a pickle.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from common.batching import EpochPlan
from common.checkpoints import checkpoint_meta, sealed_meta, unreadable
from common.errors import CheckpointError, UserFacingError
from common.progress import EpochProgress
from common.system import pin_to_cores, usable_cpu_count
from common.training import TrainerConfig
from jax_impl.epochs import EPOCH_RUNNERS, AheadOfTime, default_epoch_runner
from jax_impl.ops import layers_for, resolve_ops
from jax_impl.schedules import learning_rate_schedule
from jax_impl.steps import create_train_state, eval_step

CHECKPOINT_KEYS = {"meta", "state"}


def limit_threads(threads: int | None) -> None:
    """--threads: pin the process to that many cores. XLA sizes its CPU thread pool from the
    cores the process may use when the backend starts, so this must run before first use."""
    if threads and not pin_to_cores(threads):
        raise UserFacingError(
            f"--threads {threads}: JAX's CPU backend sizes its thread pool from the cores the process may "
            f"run on, and only Linux lets a program choose them ({sys.platform} does not). Leave --threads "
            "out here: XLA then uses every core.")


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


def describe(device: jax.Device, ops: str, epoch_runner_name: str) -> dict[str, Any]:
    """The facts of a JAX run that config.json records."""
    return {"framework": "JAX", "version": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "device": str(device), "ops": ops, "epoch": epoch_runner_name, "threads": usable_cpu_count()}


class JaxTrainer:
    """Train state of one run, seeded by `seed`, with the layers and epoch loop suited to its device."""

    def __init__(self, config: TrainerConfig):
        limit_threads(config.threads)
        self.device = select_device(config.device)
        self.ops = resolve_ops(config.ops, self.device.platform)
        self.schedule = learning_rate_schedule(config.recipe, config.steps_per_epoch)
        state, self.dropout_key = initial_state(jax.random.key(config.seed), config, self.ops)
        self.state, self.dropout_key = jax.device_put((state, self.dropout_key), self.device)
        self.epoch_runner = EPOCH_RUNNERS[default_epoch_runner(self.device)](self.device)
        self.evaluate = AheadOfTime(jax.jit(eval_step))

    def describe(self) -> dict[str, Any]:
        return describe(self.device, self.ops, self.epoch_runner.name)

    def learning_rate(self) -> float:
        return float(self.schedule(int(self.state.step)))

    def compile_seconds(self) -> float:
        return self.epoch_runner.step.compile_seconds + self.evaluate.compile_seconds

    def train_epoch(self, plan: EpochPlan, images: np.ndarray, labels: np.ndarray, progress: EpochProgress) -> None:
        self.state = self.epoch_runner(self.state, self.dropout_key, [plan], images, labels, [progress])

    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        return predict_in_batches(self.evaluate, self.state, images, batch_size, self.device)

    def checkpoint_bytes(self, meta: dict) -> bytes:
        return checkpoint_bytes(self.state, meta)

    def restore(self, state: dict) -> None:
        try:
            restored = serialization.from_state_dict(self.state, state["state"])
        except (KeyError, ValueError, TypeError) as error:
            raise CheckpointError(f"the checkpoint's state does not fit this model and recipe: {error}") from error
        _check_shapes(self.state, restored)
        self.state = jax.device_put(restored, self.device)

    def state_is_finite(self) -> bool:
        """Whether every weight and BatchNorm statistic is a finite number."""
        return _all_finite((self.state.params, self.state.batch_stats))

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


class JaxSeedGroup:
    """Several seeds trained in one compiled program: their states stacked on a leading axis
    and every training step vmapped over it (on CPU applied seed by seed instead, see
    `epochs.seed_by_seed`). Seed k starts from the weights and dropout key a single run
    of seed k would, and sees that run's batches, so it follows the same trajectory."""

    def __init__(self, config: TrainerConfig, seeds: list[int]):
        limit_threads(config.threads)
        self.device = select_device(config.device)
        self.ops = resolve_ops(config.ops, self.device.platform)
        self.seeds = seeds
        self.schedule = learning_rate_schedule(config.recipe, config.steps_per_epoch)
        keys = jnp.stack([jax.random.key(seed) for seed in seeds])
        state, self.dropout_keys = jax.vmap(lambda key: initial_state(key, config, self.ops))(keys)
        self.state, self.dropout_keys = jax.device_put((state, self.dropout_keys), self.device)
        self.epoch_runner = EPOCH_RUNNERS[default_epoch_runner(self.device)](self.device, grouped=True)
        self.evaluate = AheadOfTime(jax.jit(jax.vmap(eval_step, in_axes=(0, None))))

    def describe(self) -> dict[str, Any]:
        return {**describe(self.device, self.ops, self.epoch_runner.name), "seeds in one program": len(self.seeds)}

    def learning_rate(self) -> float:
        return float(self.schedule(int(self.state.step[0])))

    def compile_seconds(self) -> float:
        return self.epoch_runner.step.compile_seconds + self.evaluate.compile_seconds

    def train_epoch(self, plans: list[EpochPlan], images: np.ndarray, labels: np.ndarray,
                    progresses: list[EpochProgress]) -> None:
        self.state = self.epoch_runner(self.state, self.dropout_keys, plans, images, labels, progresses)

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        return list(predict_in_batches(self.evaluate, self.state, images, batch_size, self.device, axis=1))

    def checkpoint_bytes(self, meta: dict, index: int) -> bytes:
        return checkpoint_bytes(jax.tree_util.tree_map(lambda leaf: leaf[index], self.state), meta)

    def state_is_finite(self, index: int) -> bool:
        return _all_finite(jax.tree_util.tree_map(lambda leaf: leaf[index], (self.state.params,
                                                                               self.state.batch_stats)))

    def model_bytes(self, index: int) -> bytes:
        weights = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        one = jax.tree_util.tree_map(lambda leaf: leaf[index], jax.device_get(weights))
        return serialization.msgpack_serialize(serialization.to_state_dict(one))


def initial_state(key: jax.Array, config: TrainerConfig, ops: str):
    """(train state, dropout key) of the seed whose root key is `key`, with the layers of `ops`."""
    init_key, dropout_key = jax.random.split(key)
    state = create_train_state(init_key, config.recipe, config.steps_per_epoch, layers_for(ops))
    return state, dropout_key


def predict_in_batches(evaluate: AheadOfTime, state, images: np.ndarray, batch_size: int, device: jax.Device,
                       axis: int = 0) -> np.ndarray:
    """Eval-mode log-probabilities of normalised images (N, 28, 28), `batch_size` at a time."""
    outputs = []
    for start in range(0, len(images), batch_size):
        inputs = jax.device_put(images[start : start + batch_size, ..., None], device)
        outputs.append(evaluate(len(inputs), state, inputs))
    return np.concatenate([np.asarray(out) for out in outputs], axis=axis)


def checkpoint_bytes(state, meta: dict) -> bytes:
    """One seed's whole training state and `meta`, as msgpack. The digest is taken over the
    contents as msgpack gives them back (NumPy arrays), so that loading can recompute it."""
    contents = {"state": serialization.msgpack_restore(serialization.msgpack_serialize(
        serialization.to_state_dict(jax.device_get(state))))}
    return serialization.msgpack_serialize({"meta": sealed_meta(meta, contents), **contents})


def _all_finite(tree) -> bool:
    return all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(tree))


def _check_shapes(expected, given) -> None:
    for (path, want), (_, got) in zip(jax.tree_util.tree_leaves_with_path(expected),
                                      jax.tree_util.tree_leaves_with_path(given), strict=True):
        if np.shape(want) != np.shape(got):
            raise CheckpointError(f"the checkpoint does not fit the model: {jax.tree_util.keystr(path)} has shape "
                                  f"{np.shape(got)}, the model needs {np.shape(want)}")


def _load(path: Path) -> object:
    """msgpack_restore: plain arrays and strings only, so loading never executes code."""
    try:
        return serialization.msgpack_restore(Path(path).read_bytes())
    except Exception as error:  # msgpack raises several types for truncated or foreign files
        raise unreadable(path, "JAX", error) from error


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(meta, state) of a checkpoint written by JaxTrainer."""
    payload = _load(path)
    return checkpoint_meta(payload, path, "jax", "jax_impl", CHECKPOINT_KEYS), payload


def read_weights(path: Path) -> dict:
    """Variables {"params", "batch_stats"} from a training checkpoint (checkpoint.msgpack) or a
    weights file (model.msgpack from --save-model, or a converted PyTorch model)."""
    payload = _load(path)
    if isinstance(payload, dict) and "meta" in payload:  # a training checkpoint: check its digest too
        checkpoint_meta(payload, path, "jax", "jax_impl", CHECKPOINT_KEYS)
    if isinstance(payload, dict) and "state" in payload:
        payload = payload["state"]
    if not isinstance(payload, dict) or not {"params", "batch_stats"} <= set(payload):
        raise CheckpointError(f"{path} holds neither a jax_impl checkpoint nor model weights")
    return {"params": payload["params"], "batch_stats": payload["batch_stats"]}
