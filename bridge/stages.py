"""The stages of bridge.diff, run on one model pair: forward-eval, forward-train, running-stats,
gradients and step, each a list of checks in PyTorch's execution order."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import linen as nn
from flax import nnx

from bridge import nnx_side
from bridge.capture import Call, DropoutDraws, channels_last, flax_calls, torch_calls
from bridge.hints import Divergence
from bridge.mapping import NORMALISATIONS, WeightMap, flatten, flax_module_candidates
from bridge.report import STAGES, Check, Report, relative_difference

OUTPUT = "(output)"  # how reports name the whole model's output
LEARNING_RATE, MOMENTUM = 0.1, 0.9
# Each program here is compiled once and run once on a few inputs, so compiling is nearly all its
# cost: LLVM's optimisation of the machine code (not XLA's own passes) is turned off, which
# changes results only within rounding (the saving: docs/development.md).
COMPILE_FAST = {"xla_backend_optimization_level": 0}


def _leaves(output) -> list[np.ndarray]:
    if isinstance(output, torch.Tensor):
        return [output.numpy()]
    if isinstance(output, tuple | list):
        return [leaf for item in output for leaf in _leaves(item)]
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(output) if hasattr(leaf, "shape")]


def _as_flax_layout(array: np.ndarray, rank: int, flax_shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch activations of the input's rank, channels moved last, unless already of Flax's shape."""
    moved = channels_last(array) if array.ndim == rank and rank >= 3 else array
    return moved if moved.shape == flax_shape or array.shape != flax_shape else array


@dataclass
class Subjects:
    """The models and the stage-independent inputs of one comparison."""

    torch_model: torch.nn.Module
    flax_module: nn.Module | nnx.Module
    mapping: WeightMap
    variables: dict  # Flax, converted from the PyTorch model's initial state
    torch_state: dict  # the PyTorch model's initial state, to restore before each stage
    images: np.ndarray  # PyTorch's layout
    mode: Callable[[bool], dict]
    dtypes: tuple
    tolerance: float
    draws: DropoutDraws
    stage: str = STAGES[0]  # the stage running, named if a side raises

    def torch_input(self) -> torch.Tensor:
        return torch.as_tensor(self.images, dtype=self.dtypes[0])

    def flax_input(self) -> jax.Array:
        return jnp.asarray(channels_last(self.images), self.dtypes[1])

    def reset_torch(self, train: bool) -> None:
        self.torch_model.load_state_dict(self.torch_state)
        self.torch_model.train(train)


def randomised_statistics(model: torch.nn.Module, seed: int) -> None:
    """Running statistics away from 0 and 1 so that eval mode tests them, and normalisation affine
    parameters away from 1 and 0 so that a swapped scale and bias shows."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            for name, scale, offset in (("weight", 0.3, 1.0), ("bias", 0.3, 0.0)):
                tensor = getattr(module, name, None)
                if isinstance(module, NORMALISATIONS) and tensor is not None:
                    tensor.copy_(offset + scale * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(0.5 * torch.randn(module.running_mean.shape, generator=generator,
                                                            dtype=module.running_mean.dtype))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(module.running_var.shape, generator=generator,
                                                                dtype=module.running_var.dtype))


def _forward_checks(stage: str, side: Subjects, torch_run: list[Call], flax_run: list[Call],
                    contexts: dict) -> list[Check]:
    """Pair each PyTorch call with the Flax call of the same module (by the weight map, else by
    name), in PyTorch's order; the whole model's output last."""
    flax_by_path: dict[str, list[Call]] = {}
    for call in flax_run:
        flax_by_path.setdefault(call.path, []).append(call)
    used: dict[str, int] = {}
    checks, unpaired = [], []
    rank = side.images.ndim
    for call in torch_run:
        paired = side.mapping.flax_module(call.path)
        candidates = ["/".join(paired)] if paired is not None else \
            ["/".join(path) for path in flax_module_candidates(call.path)]
        path = next((c for c in candidates if len(flax_by_path.get(c, ())) > used.get(c, 0)), None)
        if path is None:
            unpaired.append(call.module)
            continue
        twin = flax_by_path[path][used.get(path, 0)]
        used[path] = used.get(path, 0) + 1
        ours, theirs = _leaves(twin.output), _leaves(call.output)
        if len(ours) != len(theirs):
            rel, note = float("inf"), f"{len(theirs)} PyTorch outputs, {len(ours)} Flax outputs"
        else:
            pairs = [(o, _as_flax_layout(t, rank, o.shape)) for o, t in zip(ours, theirs, strict=True)]
            rel = max((relative_difference(o, t) for o, t in pairs), default=0.0)
            note = "; ".join(f"shapes {t.shape} (PyTorch, in Flax's layout) and {o.shape} (Flax)"
                             for o, t in pairs if o.shape != t.shape)
        name = call.path or OUTPUT
        check = Check(stage, name, path or OUTPUT, rel, side.tolerance, rel <= side.tolerance, note)
        checks.append(check)
        torch_input = _leaves(call.inputs)[:1]
        flax_input = _leaves(twin.inputs)[:1]
        contexts[(stage, name)] = Divergence(
            stage, call.module, twin.module,
            _as_flax_layout(torch_input[0], rank, flax_input[0].shape) if torch_input and flax_input else None,
            flax_input[0] if flax_input else None, ran_since=list(unpaired))
        if check.ok:
            unpaired = []
    return checks


@contextlib.contextmanager
def precision(dtype: str) -> Iterator[None]:
    """float64 JAX arrays when asked; full-precision float32 matmuls and convolutions on both sides
    (GPUs default to TF32, ~1e-3 relative, which would make any float32 tolerance meaningless)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with jax.enable_x64(dtype == "float64"), jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _flax_apply(side: Subjects, variables: dict, train: bool,
                draws: DropoutDraws | None) -> tuple[jax.Array, dict, list[Call]]:
    """(output, updated non-parameter collections, every module call) of the Flax side: a linen
    module through `apply`, an NNX module through bridge.nnx_side."""
    if nnx_side.is_nnx(side.flax_module):
        return nnx_side.apply(side.flax_module, variables, side.flax_input(), train, draws)
    mutable = [name for name in variables if name != "params"] if train else []
    with flax_calls(draws) as calls:
        result = side.flax_module.apply(variables, side.flax_input(), **side.mode(train), mutable=mutable or False,
                                        rngs={"dropout": jax.random.key(0)})
    output, updated = result if mutable else (result, {})
    return output, updated, calls


def _flax_calls(modules: list, arrays: list) -> list[Call]:
    return [Call(path, module, inputs, output) for (path, module), (inputs, output) in zip(modules, arrays,
                                                                                           strict=True)]


def _flax_eval(side: Subjects) -> list[Call]:
    """Every module call of an eval-mode forward, compiled as one program (run op by op, a small
    model spends seconds compiling each operation for its shapes)."""
    modules: list[tuple[str, object]] = []

    def run(variables):
        _, _, calls = _flax_apply(side, variables, train=False, draws=None)
        modules[:] = [(call.path, call.module) for call in calls]
        return [(call.inputs, call.output) for call in calls]

    return _flax_calls(modules, jax.device_get(jax.jit(run, compiler_options=COMPILE_FAST)(side.variables)))


def _flax_train(side: Subjects, output_weights: np.ndarray) -> tuple[list[Call], dict, dict]:
    """(every module call, updated collections, parameter gradients) of a training-mode forward
    with the injected masks, the gradient of sum(output * output_weights): one compiled program."""
    modules: list[tuple[str, object]] = []

    def loss(params):
        out, updated, calls = _flax_apply(side, {**side.variables, "params": params}, train=True, draws=side.draws)
        modules[:] = [(call.path, call.module) for call in calls]
        weights = jnp.asarray(_as_flax_layout(output_weights, side.images.ndim, out.shape), out.dtype)
        return jnp.sum(out * weights), (updated, [(call.inputs, call.output) for call in calls])

    program = jax.jit(jax.grad(loss, has_aux=True), compiler_options=COMPILE_FAST)
    gradients, (updated, arrays) = jax.device_get(program(side.variables["params"]))
    return _flax_calls(modules, arrays), updated, gradients


def _tensor_checks(stage: str, side: Subjects, torch_values: Mapping[str, np.ndarray], flax_values: Mapping,
                   pairs) -> list[Check]:
    """One check per weight pair. A tensor that is zero in exact arithmetic (the gradient of a bias
    followed by BatchNorm) holds only rounding on both sides, whose ratio means nothing: it is
    equal when both sides are within the tolerance of the stage's largest tensor."""
    leaves = flatten(flax_values)
    compared = [(pair, np.asarray(leaves[pair.flax_path]), pair.to_flax(np.asarray(torch_values[pair.torch_key])))
                for pair in pairs]
    largest = max((float(np.abs(theirs).max()) for _, _, theirs in compared if theirs.size), default=0.0)
    checks = []
    for pair, ours, theirs in compared:
        rel = relative_difference(ours, theirs)
        negligible = ours.shape == theirs.shape and theirs.size and \
            max(np.abs(ours).max(), np.abs(theirs).max()) <= side.tolerance * largest
        checks.append(Check(stage, pair.torch_key, pair.flax_name, rel, side.tolerance,
                            bool(rel <= side.tolerance or negligible),
                            "zero but for rounding on both sides" if negligible and rel > side.tolerance else ""))
    return checks


def _in_execution_order(pairs, torch_run: list[Call]) -> list:
    first = {}
    for index, call in enumerate(torch_run):
        first.setdefault(call.path, index)
    return sorted(pairs, key=lambda pair: first.get(pair.torch_key.rpartition(".")[0], len(torch_run)))


def run_stages(side: Subjects, report: Report, contexts: dict) -> None:
    model, mapping = side.torch_model, side.mapping
    side.reset_torch(train=False)
    with torch_calls(model, None) as torch_eval, torch.no_grad():
        model(side.torch_input())
    report.checks += _forward_checks("forward-eval", side, torch_eval, _flax_eval(side), contexts)
    statistics = [p for p in _in_execution_order(mapping.pairs, torch_eval) if p.flax_path[0] != "params"]
    parameters = [p for p in _in_execution_order(mapping.pairs, torch_eval) if p.flax_path[0] == "params"]

    side.stage = "forward-train"
    side.reset_torch(train=True)
    with torch_calls(model, side.draws) as torch_train:
        output = model(side.torch_input())
    after = {key: value.detach().clone().numpy() for key, value in model.state_dict().items()}
    output_weights = np.random.default_rng(1).standard_normal(tuple(output.shape))
    (output * torch.as_tensor(output_weights, dtype=output.dtype)).sum().backward()
    flax_train, updated, flax_gradients = _flax_train(side, output_weights)
    report.checks += _forward_checks("forward-train", side, torch_train, flax_train, contexts)

    side.stage = "running-stats"
    report.checks += _tensor_checks("running-stats", side, after, updated, statistics)
    leaves = flatten(updated)
    for pair in statistics:
        module_path = pair.torch_key.rpartition(".")[0]
        call = next((c for c in torch_train if c.path == module_path), None)
        count = int(_leaves(call.inputs)[0].size // max(side.torch_state[pair.torch_key].numel(), 1)) if call else 0
        contexts[("running-stats", pair.torch_key)] = Divergence(
            "running-stats", model.get_submodule(module_path), statistic=pair.flax_path[-1],
            before=pair.to_flax(side.torch_state[pair.torch_key].numpy()),
            torch_after=pair.to_flax(after[pair.torch_key]),
            flax_after=np.asarray(leaves[pair.flax_path]), count=count)

    side.stage = "gradients"
    named = dict(model.named_parameters())
    gradients = {pair.torch_key: named[pair.torch_key].grad.numpy() if named[pair.torch_key].grad is not None
                 else np.zeros(tuple(named[pair.torch_key].shape)) for pair in parameters}
    report.checks += _tensor_checks("gradients", side, gradients, {"params": flax_gradients}, parameters)

    side.stage = "step"
    torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM).step()
    optimiser = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
    params = side.variables["params"]
    updates, _ = optimiser.update(flax_gradients, optimiser.init(params), params)
    stepped = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    report.checks += _tensor_checks("step", side, stepped, {"params": optax.apply_updates(params, updates)},
                                    parameters)


