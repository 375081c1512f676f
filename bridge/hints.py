"""The classic porting mistakes, recognised from the pattern of a divergence.

Each rule looks at the first divergence only: the two modules where it happened (their
settings), what they received, and which PyTorch layers without a Flax twin ran since the last
layer that agreed. Rules that recognise numbers (momentum, unbiased variance, flatten order)
test the hypothesis itself against the values, so a hint appears only when it explains them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from bridge.capture import TORCH_DROPOUT_SHARED_AXES
from bridge.mapping import NORMALISATIONS

EXPLAINED = 1e-6  # a hypothesis explains a difference if it leaves this much of it, relative


@dataclass
class Divergence:
    """What the rules see of the first failing check."""

    stage: str
    torch_module: object = None
    flax_module: object = None
    torch_input: np.ndarray | None = None  # in the Flax layout, as compared
    flax_input: np.ndarray | None = None
    ran_since: list = field(default_factory=list)  # PyTorch modules without a twin, since the last agreement
    statistic: str = ""  # running-stats: "mean" or "var"
    before: np.ndarray | None = None  # running-stats: the value both started from
    torch_after: np.ndarray | None = None
    flax_after: np.ndarray | None = None
    count: int = 0  # running-stats: values per channel in the batch


def _explains(prediction: np.ndarray, actual: np.ndarray) -> bool:
    return np.abs(prediction - actual).max() <= EXPLAINED * max(np.abs(actual).max(), 1e-30)


def momentum_convention(d: Divergence) -> str | None:
    """Fits flax_after = kept * before + (1 - kept) * batch, the batch value taken from PyTorch's update."""
    if d.stage != "running-stats" or not isinstance(d.torch_module, torch.nn.modules.batchnorm._BatchNorm):
        return None
    momentum = d.torch_module.momentum
    if not momentum:
        return None
    batch = (d.torch_after - (1 - momentum) * d.before) / momentum
    spread = d.before - batch
    if not np.any(spread):
        return None
    kept = float(np.dot(d.flax_after - batch, spread) / np.dot(spread, spread))
    if abs(kept - (1 - momentum)) < 1e-6 or not _explains(kept * d.before + (1 - kept) * batch, d.flax_after):
        return None
    return (f"BatchNorm momentum convention: the Flax side keeps {kept:.4g} of the running {d.statistic} per "
            f"step, PyTorch keeps {1 - momentum:.4g}. PyTorch's momentum {momentum:g} weighs the NEW batch "
            f"(running = (1 - m) * running + m * batch); Flax's nn.BatchNorm weighs the OLD value: "
            f"use momentum={1 - momentum:g} there.")


def biased_variance(d: Divergence) -> str | None:
    """Tests flax_after = (1 - m) * before + m * (n - 1) / n * (PyTorch's unbiased batch variance)."""
    if d.statistic != "var" or not isinstance(d.torch_module, torch.nn.modules.batchnorm._BatchNorm) or d.count < 2:
        return None
    momentum = d.torch_module.momentum or 0.0
    unbiased = (d.torch_after - (1 - momentum) * d.before) / momentum if momentum else None
    if unbiased is None or not _explains((1 - momentum) * d.before + momentum * unbiased * (d.count - 1) / d.count,
                                         d.flax_after):
        return None
    return (f"biased running variance: PyTorch updates running_var with the UNBIASED batch variance "
            f"(n / (n - 1) times the biased one, n = {d.count} values per channel here); Flax's "
            "nn.BatchNorm keeps the biased one and has no option for it: port BatchNorm as a module "
            "that multiplies by n / (n - 1) (jax_impl/model.py's BatchNorm2d does).")


def epsilon(d: Divergence) -> str | None:
    flax_epsilon = getattr(d.flax_module, "epsilon", None)
    if not isinstance(d.torch_module, NORMALISATIONS) or flax_epsilon is None:
        return None
    if np.isclose(flax_epsilon, d.torch_module.eps, rtol=1e-9, atol=0):
        return None
    return (f"epsilon: PyTorch's {type(d.torch_module).__name__} has eps={d.torch_module.eps:g}, the Flax "
            f"module epsilon={flax_epsilon:g} (Flax's default is 1e-6, PyTorch's 1e-5).")


def _same_padding(sizes, kernel, strides, dilation) -> list[tuple[int, int]]:
    """What 'SAME' pads, per axis: the output keeps ceil(size / stride), the extra at the end."""
    pairs = []
    for size, k, stride, rate in zip(sizes, kernel, strides, dilation, strict=True):
        total = max((-(-size // stride) - 1) * stride + (k - 1) * rate + 1 - size, 0)
        pairs.append((total // 2, total - total // 2))
    return pairs


def _padding_pairs(padding, same: list[tuple[int, int]]) -> list[tuple[int, int]] | str:
    """Either framework's padding as (before, after) per spatial axis; another string as it is."""
    if isinstance(padding, str):
        return {"SAME": same, "VALID": [(0, 0)] * len(same)}.get(padding.upper(), padding)
    if isinstance(padding, int):
        return [(padding, padding)] * len(same)
    return [tuple(p) if isinstance(p, tuple | list) else (p, p) for p in padding]


def padding(d: Divergence) -> str | None:
    """Compares what each side pads for this layer's input, 'SAME' worked out for its size."""
    module = d.torch_module
    if not isinstance(module, torch.nn.modules.conv._ConvNd) or not hasattr(d.flax_module, "padding") \
            or d.flax_input is None:
        return None
    same = _same_padding(d.flax_input.shape[1:-1], module.kernel_size, module.stride, module.dilation)
    ours, theirs = _padding_pairs(module.padding, same), _padding_pairs(d.flax_module.padding, same)
    if ours == theirs:
        return None
    if isinstance(d.flax_module.padding, str) and d.flax_module.padding.upper() == "SAME":
        return (f"'SAME' padding: PyTorch pads {ours} (before, after) per axis here; Flax's 'SAME' pads {theirs}, "
                "more at the bottom/right when the stride is 2. Give Flax PyTorch's explicit padding "
                f"{tuple(ours)}.")
    return f"padding: PyTorch pads {ours} (before, after) per axis, the Flax convolution {theirs}."


def flatten_order(d: Divergence) -> str | None:
    """The inputs of a linear layer hold the same values per example in another order."""
    if not isinstance(d.torch_module, torch.nn.Linear) or d.torch_input is None or d.flax_input is None:
        return None
    ours, theirs = np.asarray(d.torch_input), np.asarray(d.flax_input)
    if ours.shape != theirs.shape or ours.ndim != 2 or _explains(theirs, ours):
        return None
    if not _explains(np.sort(theirs, axis=1), np.sort(ours, axis=1)):
        return None
    return ("flatten order: this linear layer receives the same values in another order. PyTorch flattens "
            "(N, C, H, W), channels first; a Flax port that flattens its (N, H, W, C) activations must "
            "transpose to (N, C, H, W) first (or permute the Dense kernel's rows).")


def pooling(d: Divergence) -> str | None:
    for module in [*d.ran_since, d.torch_module]:
        if isinstance(module, torch.nn.AvgPool2d | torch.nn.AvgPool1d | torch.nn.AvgPool3d) and module.padding:
            divides = "the whole window" if module.count_include_pad else "the values inside the image"
            return (f"average-pool count_include_pad: PyTorch's {module} ran since the last equal layer; with "
                    f"padding it divides by {divides} (count_include_pad={module.count_include_pad}): Flax's "
                    "avg_pool must be given the same count_include_pad.")
        if isinstance(module, torch.nn.MaxPool2d | torch.nn.MaxPool1d | torch.nn.MaxPool3d) and module.ceil_mode:
            return (f"max-pool ceil_mode: PyTorch's {module} keeps a partial window at the bottom/right "
                    "edge; Flax's max_pool has no ceil_mode: pad the bottom/right with -inf to match.")
    return None


def dropout(d: Divergence) -> str | None:
    kind = type(d.torch_module)
    if kind not in TORCH_DROPOUT_SHARED_AXES or not hasattr(d.flax_module, "broadcast_dims"):
        return None
    shared = TORCH_DROPOUT_SHARED_AXES[kind]
    expected_flax = tuple(range(1, len(shared) + 1))  # NCHW's spatial axes, channels moved last
    if tuple(d.flax_module.broadcast_dims) != expected_flax or d.flax_module.rate != d.torch_module.p:
        return (f"dropout: PyTorch's {kind.__name__}(p={d.torch_module.p}) drops "
                f"{'whole channels' if shared else 'single values'}; the Flax Dropout has rate={d.flax_module.rate} "
                f"and broadcast_dims={tuple(d.flax_module.broadcast_dims)} (to match: {expected_flax}).")
    return None


RULES: tuple[Callable[[Divergence], str | None], ...] = (
    momentum_convention, biased_variance, epsilon, padding, flatten_order, pooling, dropout)


def hint(divergence: Divergence) -> str | None:
    """The first rule that recognises the divergence, or None."""
    for rule in RULES:
        found = rule(divergence)
        if found:
            return found
    return None
