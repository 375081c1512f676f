"""The layering rules of the packages, read from the source with tools/import_graph.py (never by importing it).

    common: numpy, the standard library, tqdm, matplotlib; no framework. common.sources alone may
        also import the optional data sources (tensorflow_datasets, tensorflow, torchvision).
    torch_ref, jax_impl: common and their own framework; never each other, never the bridge.
    nnx_impl: common, the JAX stack and jax_impl (the helpers both Flax twins share); never torch.
    bridge: common, torch_ref and jax_impl (the only package that sees both).

and everywhere no import cycle and no import of a command module (`train`, `evaluate`: the command
line imports, nothing imports the command line), plus a size limit on the modules of common,
torch_ref and jax_impl. Each check returns the offences
as lines that name the module and what it imports, so a failure says what to move. The same checks
run on small made-up trees, one that breaks every rule and one that keeps them, so that a pass on
the real tree means the rules hold and not that the scanner saw nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.import_graph import (
    import_cycles,
    module_files,
    module_imports,
    package_of,
    structure_violations,
    third_party_imports,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
SIZE_LIMITED = ("common", "torch_ref", "jax_impl", "nnx_impl")
TORCH = frozenset({"torch", "torchvision"})
JAX = frozenset({"jax", "jaxlib", "flax", "optax", "chex"})
COMMON_MAY_USE = frozenset({"numpy", "tqdm", "matplotlib"})
# google: protobuf, with which tfds parses a prepared copy's dataset_info.json (its errors are caught).
DATA_SOURCES = {"common.sources": frozenset({"tensorflow_datasets", "tensorflow", "importlib_resources", "google",
                                             "torchvision"})}


def _offences(root: Path, package: str, forbidden_packages: set[str], forbidden_names: frozenset[str]) -> list[str]:
    """'module imports X' for each import by `package` of a forbidden project package or third-party name."""
    found = [
        f"{module} imports {target}"
        for module, targets in module_imports(root).items()
        if package_of(module) == package
        for target in sorted(targets)
        if package_of(target) in forbidden_packages
    ]
    found += [
        f"{module} imports {name}"
        for module, names in third_party_imports(root).items()
        if package_of(module) == package
        for name in sorted(names & forbidden_names - DATA_SOURCES.get(module, frozenset()))
    ]
    return sorted(found)


def _packages(root: Path) -> set[str]:
    return {package_of(module) for module in module_files(root)}


def common_offences(root: Path) -> list[str]:
    """common importing a framework, or any project package but itself."""
    return _offences(root, "common", _packages(root) - {"common"}, TORCH | JAX)


def common_third_party_offences(root: Path) -> list[str]:
    """common importing a third-party name outside numpy, tqdm and matplotlib."""
    return sorted(
        f"{module} imports {name}"
        for module, names in third_party_imports(root).items()
        if package_of(module) == "common"
        for name in names - COMMON_MAY_USE - DATA_SOURCES.get(module, frozenset())
    )


def framework_offences(root: Path) -> list[str]:
    """jax_impl importing torch_ref, nnx_impl or torch; nnx_impl importing torch_ref or torch; torch_ref
    importing either Flax twin or the JAX stack; any a bridge."""
    packages = _packages(root)
    return (_offences(root, "jax_impl", packages - {"common", "jax_impl"}, TORCH)
            + _offences(root, "nnx_impl", packages - {"common", "jax_impl", "nnx_impl"}, TORCH)
            + _offences(root, "torch_ref", packages - {"common", "torch_ref"}, JAX))


def long_modules(root: Path) -> list[str]:
    """'path: N lines' for each module of common, torch_ref and jax_impl over MAX_LINES lines."""
    found = []
    for module, path in module_files(root).items():
        if package_of(module) in SIZE_LIMITED:
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES:
                found.append(f"{path.relative_to(root)}: {lines} lines")
    return sorted(found)


def _listed(offences: list[str]) -> str:
    return "\n  " + "\n  ".join(offences)


# ---------------------------------------------------------------------------------------------
# The rules, on this repository


def test_common_imports_no_framework_and_no_other_package():
    offences = common_offences(REPO_ROOT)
    assert not offences, "common must import no framework and no project package but itself:" + _listed(offences)


def test_common_uses_only_numpy_tqdm_and_matplotlib():
    offences = common_third_party_offences(REPO_ROOT)
    assert not offences, f"common may import only {', '.join(sorted(COMMON_MAY_USE))}:" + _listed(offences)


def test_each_framework_package_sees_only_common_and_its_own_framework():
    offences = framework_offences(REPO_ROOT)
    assert not offences, "the twins must never import the other framework, its twin, or a bridge:" + (
        _listed(offences))


def test_no_import_cycles_and_nothing_imports_a_command():
    offences = [f"{v.module} imports {v.imported} ({v.rule})" for v in structure_violations(module_imports(REPO_ROOT))]
    assert not offences, "import cycles or imports of a command module:" + _listed(offences)


def test_no_module_of_the_library_is_longer_than_the_limit():
    offences = long_modules(REPO_ROOT)
    assert not offences, f"modules of {', '.join(SIZE_LIMITED)} over {MAX_LINES} lines:" + _listed(offences)


# ---------------------------------------------------------------------------------------------
# The checks themselves, on made-up trees

CLEAN_TREE = {
    "common/__init__.py": "",
    "common/spec.py": "import numpy as np\nSIZE = 28\n",
    "common/training.py": "from tqdm import tqdm\nfrom . import spec\nfrom common.spec import SIZE\n",
    "common/sources.py": "def load():\n    import tensorflow_datasets\n    from torchvision.datasets import MNIST\n",
    "torch_ref/__init__.py": "",
    "torch_ref/model.py": "import torch\nfrom common import spec\n",
    "jax_impl/__init__.py": "",
    "jax_impl/model.py": "import jax.numpy as jnp\nimport flax.linen as nn\nfrom common.training import SIZE\n",
    "nnx_impl/__init__.py": "",
    "nnx_impl/model.py": "from flax import nnx\nfrom jax_impl.model import nn\n",
    "bridge/__init__.py": "",
    "bridge/convert.py": "import torch\nimport jax\nfrom torch_ref import model\nimport jax_impl.model\n",
    # outside the layered packages: may import anything, and is not scanned
    "tests/__init__.py": "",
    "tests/test_all.py": "import torch\nimport jax\nimport bridge.convert\n",
    "benchmarks/compare.py": "import torch_ref.model\nimport jax_impl.model\n",
}

BROKEN_TREE = {
    **CLEAN_TREE,
    "common/plots.py": "def draw():\n    import torch  # lazily\n",
    "common/report.py": "import pandas\nfrom jax_impl.model import nn\n",
    "common/mnist.py": "def load():\n    import torchvision  # a data source outside common.sources\n",
    "jax_impl/convert.py": "def read(path):\n    import torch\n    from torch_ref.model import torch as t\n",
    "jax_impl/bridged.py": "from bridge import convert\n",
    "torch_ref/train.py": "import optax\nfrom ..jax_impl import model\n",
    "torch_ref/trainer.py": "x = 1\n" * (MAX_LINES + 1),
    "jax_impl/loop_a.py": "from jax_impl import loop_b\n",
    "jax_impl/loop_b.py": "def later():\n    import jax_impl.loop_a\n",
    "jax_impl/train.py": "",
    "jax_impl/helper.py": "from jax_impl.train import main\n",
    "nnx_impl/convert.py": "import torch\nfrom torch_ref import model\n",
}


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def clean_root(tmp_path: Path) -> Path:
    return _write_tree(tmp_path, CLEAN_TREE)


@pytest.fixture
def broken_root(tmp_path: Path) -> Path:
    return _write_tree(tmp_path, BROKEN_TREE)


def test_the_scanner_reads_every_form_of_import(clean_root: Path):
    imports = module_imports(clean_root)
    assert set(imports) == {"common", "common.spec", "common.training", "common.sources", "torch_ref",
                            "torch_ref.model", "jax_impl", "jax_impl.model", "nnx_impl", "nnx_impl.model", "bridge",
                            "bridge.convert"}  # no tests, no benchmarks
    assert imports["common.training"] == {"common.spec"}  # `from . import spec` and `from common.spec import SIZE`
    assert imports["torch_ref.model"] == {"common.spec"}  # `from common import spec` is the module common.spec
    assert imports["bridge.convert"] == {"torch_ref.model", "jax_impl.model"}
    third_party = third_party_imports(clean_root)
    assert third_party["jax_impl.model"] == {"jax", "flax"}
    assert third_party["common.training"] == {"tqdm"}  # the standard library and project names are not
    assert third_party["common.sources"] == {"tensorflow_datasets", "torchvision"}  # inside a function


def test_a_tree_that_keeps_the_rules_passes_every_check(clean_root: Path):
    assert common_offences(clean_root) == []
    assert common_third_party_offences(clean_root) == []
    assert framework_offences(clean_root) == []
    assert long_modules(clean_root) == []
    assert structure_violations(module_imports(clean_root)) == []


def test_a_tree_that_breaks_the_rules_is_caught_module_by_module(broken_root: Path):
    assert common_offences(broken_root) == ["common.mnist imports torchvision", "common.plots imports torch",
                                            "common.report imports jax_impl.model"]
    assert common_third_party_offences(broken_root) == [
        "common.mnist imports torchvision", "common.plots imports torch", "common.report imports pandas"]
    assert framework_offences(broken_root) == [
        "jax_impl.bridged imports bridge.convert",
        "jax_impl.convert imports torch",  # inside a function
        "jax_impl.convert imports torch_ref.model",
        "nnx_impl.convert imports torch",
        "nnx_impl.convert imports torch_ref.model",
        "torch_ref.train imports jax_impl.model",  # a relative import, made absolute
        "torch_ref.train imports optax",
    ]
    assert long_modules(broken_root) == [f"{Path('torch_ref/trainer.py')}: {MAX_LINES + 1} lines"]
    internal = module_imports(broken_root)
    assert import_cycles(internal) == [["jax_impl.loop_a", "jax_impl.loop_b"]]  # one import inside a function
    assert [(v.module, v.imported, v.rule) for v in structure_violations(internal)] == [
        ("jax_impl.helper", "jax_impl.train", "nothing imports a command"),
        ("jax_impl.loop_a", "jax_impl.loop_b", "an import cycle"),
        ("jax_impl.loop_b", "jax_impl.loop_a", "an import cycle"),
    ]


def test_the_picture_and_listing_of_a_tree_with_a_bridge(broken_root: Path, tmp_path: Path, capsys):
    from tools.import_graph import main

    out = tmp_path / "picture" / "architecture.png"
    assert main(["--root", str(broken_root), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listing = capsys.readouterr().out
    assert "bridge -> jax_impl" in listing
    assert "jax_impl.convert -> torch_ref.model" in listing
    assert "torch_ref.train -> optax" in listing
    assert "jax_impl.helper -> jax_impl.train   (nothing imports a command)" in listing


def test_common_names_neither_trainer():
    """common/ is a library the trainers call: no file of it names their packages or files."""
    twins = ("torch_ref", "jax_impl", "checkpoint.pt", "checkpoint.msgpack", "model.pt", "model.msgpack")
    offences = [f"{path.relative_to(REPO_ROOT)} names {name}" for path in sorted((REPO_ROOT / "common").rglob("*.py"))
                for name in twins if name in path.read_text(encoding="utf-8")]
    assert not offences, "common must not know the trainers:" + _listed(offences)
