"""The model of docs/SPEC.md as data: the one place both frameworks and the tests read it from.

The layer table is the `torch-summary` printout of the original PyTorch model. Each
implementation derives its own table from its module (forward hooks in PyTorch, shape
evaluation in JAX) and the tests compare that against this one, so a transcription error
here would show up as a mismatch on both sides rather than being silently shared.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SIZE = 28
NUM_CLASSES = 10

# Mean and standard deviation of the MNIST training pixels in [0, 1], rounded as in the seed.
NORMALIZE_MEAN = 0.1307
NORMALIZE_STD = 0.3081

BATCHNORM_EPS = 1e-5
# PyTorch convention: running = (1 - momentum) * running + momentum * batch_statistic.
BATCHNORM_MOMENTUM = 0.1
DROPOUT_RATE = 0.15


@dataclass(frozen=True)
class LayerRow:
    """One row of the summary table: `torch-summary`'s name, output shape (C, H, W) and parameters."""

    name: str
    output_shape: tuple[int, ...]
    params: int

    @property
    def kind(self) -> str:
        """The layer type, e.g. "Conv2d" for "Conv2d-1"."""
        return self.name.rsplit("-", 1)[0]


LAYER_TABLE: tuple[LayerRow, ...] = (
    LayerRow("Conv2d-1", (8, 26, 26), 72),
    LayerRow("BatchNorm2d-2", (8, 26, 26), 16),
    LayerRow("Conv2d-3", (16, 24, 24), 1152),
    LayerRow("BatchNorm2d-4", (16, 24, 24), 32),
    LayerRow("Dropout-5", (16, 24, 24), 0),
    LayerRow("MaxPool2d-6", (16, 12, 12), 0),
    LayerRow("Conv2d-7", (8, 12, 12), 128),
    LayerRow("BatchNorm2d-8", (8, 12, 12), 16),
    LayerRow("Conv2d-9", (16, 10, 10), 1152),
    LayerRow("BatchNorm2d-10", (16, 10, 10), 32),
    LayerRow("Dropout-11", (16, 10, 10), 0),
    LayerRow("MaxPool2d-12", (16, 5, 5), 0),
    LayerRow("Conv2d-13", (16, 5, 5), 256),
    LayerRow("BatchNorm2d-14", (16, 5, 5), 32),
    LayerRow("Conv2d-15", (10, 3, 3), 1440),
    LayerRow("AvgPool2d-16", (10, 1, 1), 0),
)

TOTAL_PARAMS = 4328


def format_layer_table(rows: tuple[LayerRow, ...] | list[LayerRow]) -> str:
    """Render rows in torch-summary's layout, so both frameworks print the table of SPEC.md."""
    lines = [f"{'Layer (type)':>20}  {'Output Shape':>25} {'Param #':>15}"]
    for row in rows:
        shape = "[" + ", ".join(["-1", *(str(d) for d in row.output_shape)]) + "]"
        lines.append(f"{row.name:>20}  {shape:>25} {row.params:>15,}")
    lines.append(f"Total params: {sum(row.params for row in rows):,}")
    return "\n".join(lines)


def conv_macs_per_image(rows: tuple[LayerRow, ...] = LAYER_TABLE) -> int:
    """Multiply-adds of the convolutions for one image: a bias-free convolution uses each of its
    weights once per output position, so MACs = parameters x output height x output width."""
    return sum(row.params * row.output_shape[1] * row.output_shape[2] for row in rows if row.kind == "Conv2d")


def training_flops_per_image(rows: tuple[LayerRow, ...] = LAYER_TABLE) -> int:
    """FLOPs (2 per multiply-add) of the convolutions in one training step, per image: the
    forward pass, the weight gradients, and the input gradients of every convolution but the
    first (its input is the data). BatchNorm, ReLU, pooling and the update add a few percent."""
    convs = [row for row in rows if row.kind == "Conv2d"]
    forward = conv_macs_per_image(rows)
    first = convs[0].params * convs[0].output_shape[1] * convs[0].output_shape[2]
    return 2 * (forward + forward + (forward - first))
