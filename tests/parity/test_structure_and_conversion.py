"""(a) Structure, and the weight conversion both ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge.convert import flax_to_torch, project_map, torch_to_flax
from bridge.mapping import MappingError
from common.spec import LAYER_TABLE, TOTAL_PARAMS
from jax_impl.model import Net as FlaxNet
from jax_impl.summary import layer_rows as flax_rows
from tests.parity.helpers import flax_variables, torch_model
from torch_ref.model import Net as TorchNet
from torch_ref.summary import layer_rows as torch_rows


def test_both_tables_equal_the_spec_row_by_row(layers):
    for ours, theirs, spec in zip(torch_rows(TorchNet()), flax_rows(FlaxNet(layers=layers)), LAYER_TABLE,
                                  strict=True):
        assert (ours.kind, ours.output_shape, ours.params) == (theirs.kind, theirs.output_shape, theirs.params)
        assert ours == theirs == spec


def test_converted_variables_hold_every_value():
    model = torch_model()
    variables = flax_variables(model)
    params = sum(np.size(x) for m in variables["params"].values() for x in m.values())
    buffers = [np.asarray(x) for m in variables["batch_stats"].values() for x in m.values()]
    assert params == TOTAL_PARAMS
    assert sum(b.size for b in buffers) == 128
    for i in range(1, 6):
        bn = getattr(model, f"bn{i}")
        np.testing.assert_array_equal(variables["batch_stats"][f"bn{i}"]["mean"], bn.running_mean.numpy())
        np.testing.assert_array_equal(variables["batch_stats"][f"bn{i}"]["var"], bn.running_var.numpy())
        np.testing.assert_array_equal(variables["params"][f"bn{i}"]["scale"], bn.weight.detach().numpy())
    np.testing.assert_array_equal(variables["params"]["conv2"]["kernel"],
                                  model.conv2.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_round_trip_is_exact_and_loads_strictly():
    model = torch_model(seed=3)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    back = flax_to_torch(torch_to_flax(state), num_batches_tracked=7)
    assert set(back) == set(state)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert int(back[key]) == 7
        else:
            np.testing.assert_array_equal(back[key], value)
    TorchNet().load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)


def test_paths_name_layer_and_collection():
    paths = {pair.torch_key: pair.flax_path for pair in project_map().pairs}
    assert paths["conv4.weight"] == ("params", "conv4", "kernel")
    assert paths["bn2.running_var"] == ("batch_stats", "bn2", "var")
    assert paths["bn2.weight"] == ("params", "bn2", "scale")
    assert project_map().skipped == tuple(f"bn{i}.num_batches_tracked" for i in range(1, 6))


def state_dict():
    return {k: v.numpy() for k, v in TorchNet().state_dict().items()}


def test_missing_key_is_named():
    weights = state_dict()
    del weights["bn3.running_mean"]
    with pytest.raises(MappingError, match=r"missing PyTorch key\(s\): bn3.running_mean"):
        torch_to_flax(weights)


def test_extra_key_is_named():
    weights = state_dict() | {"fc.weight": np.zeros((10, 10))}
    with pytest.raises(MappingError, match=r"unexpected PyTorch key\(s\) 'fc.weight'"):
        torch_to_flax(weights)
    weights = state_dict() | {"conv7.weight": np.zeros((1, 1, 3, 3))}
    with pytest.raises(MappingError, match=r"unexpected PyTorch key\(s\) 'conv7.weight'"):
        torch_to_flax(weights)


def test_misshaped_key_is_named_and_never_reshaped():
    weights = state_dict()
    weights["conv2.weight"] = weights["conv2.weight"].transpose(1, 0, 2, 3)  # OIHW -> IOHW mistake
    with pytest.raises(MappingError, match=r"conv2.weight: shape \(8, 16, 3, 3\), the model needs \(16, 8, 3, 3\)"):
        torch_to_flax(weights)
    weights = state_dict()
    weights["bn1.weight"] = np.zeros(16)
    with pytest.raises(MappingError, match=r"bn1.weight: shape \(16,\), the model needs \(8,\)"):
        torch_to_flax(weights)


def test_flax_side_errors_name_the_variable():
    variables = torch_to_flax(state_dict())
    del variables["batch_stats"]["bn5"]["var"]
    with pytest.raises(MappingError, match="missing Flax variable batch_stats/bn5/var"):
        flax_to_torch(variables)
    variables = torch_to_flax(state_dict())
    variables["params"]["conv1"]["bias"] = np.zeros(8)
    with pytest.raises(MappingError, match="unexpected Flax variable.*params/conv1/bias"):
        flax_to_torch(variables)


def test_num_batches_tracked_must_be_a_scalar():
    weights = state_dict()
    weights["bn1.num_batches_tracked"] = np.zeros(3)
    with pytest.raises(MappingError, match="bn1.num_batches_tracked: expected a scalar"):
        torch_to_flax(weights)
