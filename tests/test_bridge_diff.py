"""bridge.diff, the porting harness: equal ports pass, and each classic mistake is named at its
layer and stage, with its hint.

Tolerances are the harness's defaults, the bounds users get: in float64 only the order of
reductions differs between the frameworks (~1e-16 relative per operation), so 1e-10 leaves six
orders for the growth through a few layers and one step; in float32 the same reordering gives a
few ulps per layer (~1e-6 after the Session 6 model's eight layers) against 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from flax import nnx

from bridge import convert, mapping
from bridge.diff import compare, main
from bridge.report import STAGES
from jax_impl import model as jax_model
from jax_impl.fast.choice import layers_for
from jax_impl.model import Net as FlaxNet
from nnx_impl.model import Net as NnxNet
from tests.parity import mutations
from tests.porting_models import MISTAKES, PAIRS
from torch_ref.model import Net as TorchNet


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_correct_ports_of_other_layer_kinds_are_equal(pair):
    torch_class, flax_class, shape, mode = PAIRS[pair]
    torch.manual_seed(0)
    report = compare(torch_class(), flax_class(), shape, mode=mode)
    assert report.equal, report.summary()
    assert {c.stage for c in report.checks} >= set(STAGES) - ({"running-stats"} if pair != "residual" else set())


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_classic_mistake_is_named_at_its_layer_with_its_hint(mistake):
    torch_class, flax_class, shape, mode, (stage, layer, words) = MISTAKES[mistake]
    torch.manual_seed(0)
    report = compare(torch_class(), flax_class(mistake=mistake), shape, mode=mode)
    first = report.first_divergence
    assert first is not None, report.summary()
    assert (first["stage"], first["torch"]) == (stage, layer), report.summary()
    assert first["hint"] and words in first["hint"], report.summary()


# The mutation table's mistakes in the model (tests/parity/mutations.py), where each must be named.
MODEL_MUTATIONS = {
    "flax_batchnorm_momentum": ("running-stats", "bn1.running_mean"),
    "biased_running_variance": ("running-stats", "bn1.running_var"),
    "same_padding": ("forward-eval", "conv1"),
    "batchnorm_before_relu": ("forward-eval", "bn1"),
    "channel_wise_dropout": ("forward-train", "drop1"),
    "kernel_transposed_wrong": ("forward-eval", "conv1"),
    "log_softmax_over_batch": ("forward-eval", "(output)"),
}


@pytest.fixture
def restored_modules():
    """The mutations replace names in these modules for good; put them back."""
    saved = [(module, dict(vars(module))) for module in (jax_model, mapping)]
    yield
    for module, names in saved:
        vars(module).update(names)
    convert.project_map.cache_clear()


@pytest.mark.parametrize("name", sorted(MODEL_MUTATIONS))
def test_every_model_mistake_of_the_mutation_table_is_named(name, restored_modules):
    mutations.MUTATIONS[name]()
    torch.manual_seed(0)
    report = compare(TorchNet(), FlaxNet(layers=layers_for("plain")), (1, 28, 28))
    first = report.first_divergence
    assert first is not None and (first["stage"], first["torch"]) == MODEL_MUTATIONS[name], report.summary()


def test_the_nnx_twin_is_equal_to_pytorch_from_the_command_line(capsys):
    """An NNX module on the Flax side: switched with .train() / .eval(), its calls recorded
    layer by layer, the same masks in its nnx.Dropout layers."""
    assert main(["torch_ref.model:Net", "nnx_impl.model:Net", "--input-shape", "1,28,28", "--dtype", "float64"]) == 0
    summary = capsys.readouterr().out
    assert "equal: every check within 1e-10 (float64)" in summary and "forward-eval    17 tensors" in summary


def _nnx_port_with(layer: str, make) -> NnxNet:
    model = NnxNet()
    setattr(model, layer, make(model))
    return model


NNX_MISTAKES = {  # a layer of nnx_impl's Net swapped for Flax's own, with the stage and layer it must be named at
    "nnx.BatchNorm (a biased running variance)": (
        "bn1", lambda m: nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0)),
        ("running-stats", "bn1.running_var")),
    "channel-wise dropout": (
        "drop1", lambda m: nnx.Dropout(m.drop1.rate, broadcast_dims=(1, 2), rngs=nnx.Rngs(0)),
        ("forward-train", "drop1")),
    "'SAME' padding": (
        "conv1", lambda m: nnx.Conv(1, 8, (3, 3), padding="SAME", use_bias=False, rngs=nnx.Rngs(0)),
        ("forward-eval", "conv1")),
}


@pytest.mark.parametrize("mistake", sorted(NNX_MISTAKES))
def test_an_nnx_ports_mistake_is_named_at_its_layer(mistake):
    layer, make, expected = NNX_MISTAKES[mistake]
    torch.manual_seed(0)
    report = compare(TorchNet(), _nnx_port_with(layer, make), (1, 28, 28))
    first = report.first_divergence
    assert first is not None and (first["stage"], first["torch"]) == expected, report.summary()


def test_the_command_line_exits_0_1_2_and_writes_json(tmp_path, capsys):
    pair = ["tests.porting_models:TorchPools", "tests.porting_models:FlaxPools", "--input-shape", "1,18,18"]
    assert main([*pair, "--json", str(tmp_path / "equal.json")]) == 0
    assert "equal: every check within 1e-10 (float64)" in capsys.readouterr().out
    report = json.loads((tmp_path / "equal.json").read_text())
    assert report["equal"] and report["dtype"] == "float64" and report["first_divergence"] is None
    assert set(report["checks"][0]) == {"stage", "torch", "flax", "rel", "tolerance", "ok"}

    wrong = ["tests.porting_models:TorchResidual", "tests.porting_models:FlaxResidual", "--input-shape", "3,12,12"]
    mistaken = tmp_path / "mistake.py"
    mistaken.write_text("from tests.porting_models import FlaxResidual\n"
                        "def port():\n    return FlaxResidual(mistake='flatten_order')\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        assert main([wrong[0], "mistake:port", *wrong[2:], "--json", str(tmp_path / "differ.json")]) == 1
    out = capsys.readouterr().out
    assert "first divergence: forward-eval, PyTorch fc / Flax fc" in out and "hint: flatten order" in out
    first = json.loads((tmp_path / "differ.json").read_text())["first_divergence"]
    assert set(first) >= {"stage", "torch", "flax", "rel", "tolerance", "hint"} and first["rel"] > 1e-5


@pytest.mark.parametrize(("overrides", "message"), [
    ({"fc.weight": "head/kernel"}, "PyTorch key fc.weight -> Flax head/kernel, which the Flax model does not have"),
    ({"fc.weight": "stem/kernel"}, "PyTorch keys stem.weight and fc.weight both map to Flax stem/kernel"),
    ({"stem.weight": "conv_a/kernel", "conv_a.weight": "stem/kernel"},
     "PyTorch key stem.weight (8, 3, 3, 3), axes (0, 1, 2, 3) -> (2, 3, 1, 0), is (3, 3, 3, 8); "
     "Flax conv_a/kernel is (3, 3, 8, 8)"),
    ({"fc.weight": "fc/bias"}, "PyTorch key fc.weight (5, 288)"),
])
def test_weights_that_cannot_be_paired_stop_with_exit_2_naming_both_sides(overrides, message, tmp_path, capsys):
    (tmp_path / "map.json").write_text(json.dumps(overrides))
    assert main(["tests.porting_models:TorchResidual", "tests.porting_models:FlaxResidual", "--input-shape",
                 "3,12,12", "--map", str(tmp_path / "map.json")]) == 2
    assert message in capsys.readouterr().err


def test_a_key_twice_or_nowhere_is_named():
    flax_shapes = {("params", "conv", "kernel"): (3, 3, 1, 4), ("params", "conv", "bias"): (4,)}
    model = torch.nn.Sequential()
    model.add_module("conv", torch.nn.Conv2d(1, 4, 3))
    model.add_module("extra", torch.nn.Linear(2, 2, bias=False))
    with pytest.raises(mapping.MappingError, match=r"PyTorch key extra.weight maps to no Flax variable \(tried "
                                                   r"extra/kernel.*Flax variables without a PyTorch key: none"):
        mapping.weight_map(model, flax_shapes)
    with pytest.raises(mapping.MappingError, match="PyTorch keys conv.weight and extra.weight both map to Flax "
                                                   "conv/kernel"):
        mapping.weight_map(model, flax_shapes, {"extra.weight": "conv/kernel"})
    with pytest.raises(mapping.MappingError, match="Flax variable.*no PyTorch key maps to: conv/kernel, conv/bias"):
        mapping.weight_map(torch.nn.Sequential(), flax_shapes)


def test_sequential_and_list_children_are_found_by_linen_names():
    assert mapping.flax_module_candidates("features.0.conv") == [("features_0", "conv"),
                                                                 ("features", "layers_0", "conv")]
    assert mapping.flax_module_candidates("0.1") == [("layers_0_1",), ("layers_0", "layers_1")]


def test_usage_errors_exit_2(capsys):
    assert main(["nowhere.module:Net", "jax_impl.model:Net", "--input-shape", "1,28,28"]) == 2
    assert "cannot import nowhere.module" in capsys.readouterr().err
    assert main(["torch_ref.model", "jax_impl.model:Net", "--input-shape", "1,28,28"]) == 2
    assert "write package.module:callable" in capsys.readouterr().err
    assert main(["torch_ref.model:Net", "jax_impl.model:Net", "--input-shape", "1,4,4"]) == 2
    assert "the PyTorch model cannot run on inputs of shape (8, 1, 4, 4)" in capsys.readouterr().err
    assert main(["torch_ref.model:Net", "tests.porting_models:FlaxMlp", "--input-shape", "1,28,28"]) == 2
    assert "the Flax module cannot be initialised on inputs of shape (8, 28, 28, 1)" in capsys.readouterr().err
    assert main(["torch_ref.model:Net", "tests.porting_models:MISTAKES", "--input-shape", "1,28,28"]) == 2
    assert "tests.porting_models:MISTAKES is not callable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["torch_ref.model:Net", "jax_impl.model:Net", "--input-shape", "1,x"])
    assert exit_.value.code == 2
    assert "1,x" in capsys.readouterr().err
