"""Where a PyTorch run computes: --device, --ops, --threads, and the facts config.json records."""

from __future__ import annotations

from typing import Any

import torch

from common.errors import UserFacingError


def limit_threads(threads: int | None) -> None:
    """--threads: the size of PyTorch's intra-op thread pool."""
    if threads:
        torch.set_num_threads(threads)


def select_device(choice: str) -> torch.device:
    """--device: auto -> CUDA when available, else CPU; gpu insists on CUDA."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserFacingError("--device gpu: PyTorch sees no CUDA device here; use --device cpu or auto.")
    return torch.device("cuda", torch.cuda.current_device())  # a process's own GPU (torch_ref.distributed)


def resolve_ops(choice: str) -> str:
    """--ops for PyTorch. fast is PyTorch's own tuning, the channels_last memory format (NHWC
    activations and weights, same maths). auto is plain (NCHW) on every device: channels_last
    wins on some CPUs and loses on others, and was never measured on a GPU (docs/fast_layers.md),
    so no default is right for every machine; `python benchmarks/compare.py` shows which wins on
    yours."""
    return "plain" if choice == "auto" else choice


def describe(device: torch.device, ops: str) -> dict[str, Any]:
    """The facts of a PyTorch run that config.json records."""
    return {"framework": "PyTorch", "version": torch.__version__, "device": str(device), "ops": ops,
            "threads": torch.get_num_threads()}
