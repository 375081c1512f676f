"""torch_ref's model: the SPEC table read off the model, parameters, outputs, original names."""

from __future__ import annotations

import torch

from common.spec import LAYER_TABLE, TOTAL_PARAMS, format_layer_table
from tests.test_spec import spec_table_block
from torch_ref.model import Net
from torch_ref.summary import layer_rows, summary

ORIGINAL_KEYS = {
    *(f"conv{i}.weight" for i in range(1, 7)),
    *(f"bn{i}.{name}" for i in range(1, 6)
      for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
}


def test_parameter_count():
    model = Net()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == TOTAL_PARAMS == 4328
    assert all(p.ndim != 1 or name.startswith("bn") for name, p in model.named_parameters())  # no biases


def test_layer_table_from_hooks_equals_spec():
    assert layer_rows(Net()) == list(LAYER_TABLE)
    assert summary(Net()) == format_layer_table(LAYER_TABLE) == spec_table_block()


def test_summary_leaves_the_model_as_it_was():
    model = Net().train()
    summary(model)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_output_shape_and_probabilities():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        out = model(torch.randn(7, 1, 28, 28))
    assert out.shape == (7, 10) and out.dtype == torch.float32
    # A float32 sum of ten probabilities: rounding error below 10 * 2**-24 = 6e-7.
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(7), rtol=0, atol=1e-6)


def test_state_dict_uses_the_original_notebook_names():
    assert set(Net().state_dict()) == ORIGINAL_KEYS
    original = {key: value.clone() for key, value in Net().state_dict().items()}
    Net().load_state_dict(original, strict=True)


def test_batchnorm_and_dropout_settings():
    model = Net()
    for i in range(1, 6):
        bn = getattr(model, f"bn{i}")
        assert (bn.eps, bn.momentum, bn.affine) == (1e-5, 0.1, True)
    assert model.drop1.p == model.drop2.p == 0.15
    assert type(model.drop1) is torch.nn.Dropout  # element-wise, not Dropout2d
