"""Draw the project's import graph, and list the imports that break its layering rules.

    python tools/import_graph.py [--root DIR] [--out docs/architecture.png]

The rules this checks (and prints under the picture):

    common: numpy, the standard library, tqdm, matplotlib; no framework. common.sources alone may
        also import the optional data sources (tensorflow_datasets, tensorflow, torchvision).
    torch_ref, jax_impl: common and their own framework; never each other, never the bridge.
    bridge: common, torch_ref and jax_impl (the only package that sees both).
    Everywhere: no import cycles, and no module imports a command (`train`, `evaluate`): the
        command line imports, nothing imports the command line.

The imports are read with `ast`, never by importing the code: reading a module must not import
torch or jax (slow, and absent where only one framework is installed), and a lazy import inside
a function counts as much as one at the top, because it fails the same way when it runs.
tests/test_architecture.py imports `module_imports` and `third_party_imports` from here, so the
picture and the tests read the same graph.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # only for the annotations: matplotlib is imported when a picture is drawn
    from matplotlib.axes import Axes

# Top-level directories that hold code but are not part of the layered library.
EXCLUDED_DIRS = frozenset({"tests", "tools", "benchmarks"})

# The layer of each package: a package may import its own modules and those of lower layers
# only. A package not named here (a bridge) sits above both frameworks.
LAYERS = {"common": 0, "torch_ref": 1, "jax_impl": 1}
BRIDGE_LAYER = 2

TORCH_FAMILY = frozenset({"torch", "torchvision", "torchaudio"})
JAX_FAMILY = frozenset({"jax", "jaxlib", "flax", "optax", "chex"})
COMMON_THIRD_PARTY = frozenset({"numpy", "tqdm", "matplotlib"})
# The modules users run (python -m <package>.train, .evaluate): they import, nothing imports them.
COMMAND_MODULES = frozenset({"train", "evaluate"})
# The one exception: common.sources imports the optional data sources' packages, when a run names them.
DATA_SOURCE_MODULE = "common.sources"
DATA_SOURCE_PACKAGES = frozenset({"tensorflow_datasets", "tensorflow", "importlib_resources", "torchvision"})
# The third-party names each package must not import; common has an allow-list instead.
FORBIDDEN_THIRD_PARTY = {"torch_ref": JAX_FAMILY, "jax_impl": TORCH_FAMILY}

DEFAULT_NOTES = (
    "common: numpy, the standard library, tqdm, matplotlib; no framework (common.sources: also tfds, torchvision).",
    "torch_ref, jax_impl: common and their own framework; never each other, never the bridge.",
    "bridge: common, torch_ref and jax_impl (the only package that sees both).",
    "Everywhere: no import cycles; nothing imports a command (train, evaluate).",
)


class Violation(NamedTuple):
    """One import that breaks a rule: `module` imports `imported` (a module or a top-level name)."""

    module: str
    imported: str
    rule: str


# ---------------------------------------------------------------------------------------------
# Reading the imports


def discover_packages(root: Path) -> list[str]:
    """The top-level packages: directories with an __init__.py, less tests, tools and benchmarks.

    Discovered rather than listed, so that a new package (a bridge) shows up without an edit here.
    """
    return sorted(
        path.name
        for path in root.iterdir()
        if path.is_dir()
        and path.name.isidentifier()
        and path.name not in EXCLUDED_DIRS
        and (path / "__init__.py").is_file()
    )


def package_of(module: str) -> str:
    """The top-level package of a dotted module name."""
    return module.split(".", 1)[0]


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the discovered packages, by dotted name (a package's __init__ is the package)."""
    files: dict[str, Path] = {}
    for package in discover_packages(root):
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if any(part.startswith(".") or part == "__pycache__" for part in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[tuple[str, str | None]]:
    """(dotted module, imported name or None) for every import statement, at any depth.

    `ast.walk` reaches imports inside functions and `if TYPE_CHECKING:` blocks too. Relative
    imports are made absolute, so that `from . import x` and `from pkg import x` read the same.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield base, None if alias.name == "*" else alias.name


def _parse(path: Path) -> ast.AST:
    """The syntax tree of one file; a SyntaxError names the file."""
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _resolve(dotted: str, modules: Mapping[str, Path]) -> str | None:
    """The project module that `import dotted` loads: its longest prefix that is a module."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def module_imports(root: Path) -> dict[str, set[str]]:
    """For each project module, the project modules it imports (never itself).

    `from pkg import name` counts as an import of the module `pkg.name` when that file exists,
    and of `pkg` (its __init__) otherwise, since `name` is then something defined there.
    """
    modules = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for base, name in _imported_names(_parse(path), module, path.name == "__init__.py"):
            target = f"{base}.{name}" if name and f"{base}.{name}" in modules else _resolve(base, modules)
            if target is not None and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def third_party_imports(root: Path) -> dict[str, set[str]]:
    """For each project module, the top-level names it imports that are neither stdlib nor project.

    Only the top-level name is kept (`torch.nn` is `torch`): the rules are about distributions.
    A local directory that is not a scanned package (tests, benchmarks) also lands here.
    """
    modules = module_files(root)
    packages = {package_of(module) for module in modules}
    found: dict[str, set[str]] = {}
    for module, path in modules.items():
        names: set[str] = set()
        for base, _ in _imported_names(_parse(path), module, path.name == "__init__.py"):
            top = package_of(base)
            if top and top not in packages and top not in sys.stdlib_module_names:
                names.add(top)
        found[module] = names
    return found


# ---------------------------------------------------------------------------------------------
# The rules


def layer_of(package: str) -> int:
    """0 for common, 1 for either framework, 2 for anything else (a bridge)."""
    return LAYERS.get(package, BRIDGE_LAYER)


def find_violations(internal: Mapping[str, set[str]], third_party: Mapping[str, set[str]]) -> list[Violation]:
    """Every import that breaks the layering rules, module by module, sorted."""
    found: list[Violation] = []
    for module, targets in internal.items():
        source = package_of(module)
        for target in targets:
            imported = package_of(target)
            if imported != source and layer_of(imported) >= layer_of(source):
                found.append(Violation(module, target, f"{source} may not import {imported}"))
    for module, names in third_party.items():
        source = package_of(module)
        for name in names:
            if module == DATA_SOURCE_MODULE and name in DATA_SOURCE_PACKAGES:
                continue
            if source == "common" and name not in COMMON_THIRD_PARTY:
                found.append(Violation(module, name, f"common imports only {', '.join(sorted(COMMON_THIRD_PARTY))}"))
            elif name in FORBIDDEN_THIRD_PARTY.get(source, ()):
                found.append(Violation(module, name, f"{source} may not import {name}"))
    return sorted(found + structure_violations(internal))


def import_cycles(internal: Mapping[str, set[str]]) -> list[list[str]]:
    """The modules of every import cycle (each a strongly connected group of two or more), sorted.

    Tarjan's algorithm, iteratively: a module's imports are explored before it is closed, and a
    module that reaches back to one still open closes with it into one group."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    open_modules: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(internal):
        if start in index:
            continue
        work = [(start, iter(sorted(internal.get(start, ()))))]
        index[start] = low[start] = len(index)
        open_modules.append(start)
        on_stack.add(start)
        while work:
            module, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    open_modules.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(internal.get(target, ())))))
                elif target in on_stack:
                    low[module] = min(low[module], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[module])
            if low[module] == index[module]:
                group = []
                while True:
                    member = open_modules.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == module:
                        break
                if len(group) > 1:
                    cycles.append(sorted(group))
    return sorted(cycles)


def structure_violations(internal: Mapping[str, set[str]]) -> list[Violation]:
    """Imports of a command module, and the imports that close a cycle, sorted."""
    found = [Violation(module, target, "nothing imports a command")
             for module, targets in internal.items() for target in targets
             if target.rsplit(".", 1)[-1] in COMMAND_MODULES]
    for cycle in import_cycles(internal):
        members = set(cycle)
        found += [Violation(module, target, "an import cycle")
                  for module in cycle for target in internal[module] if target in members]
    return sorted(set(found))


def package_edges(internal: Mapping[str, set[str]]) -> Counter[tuple[str, str]]:
    """(importing package, imported package) -> how many module-to-module imports make it up."""
    pairs = ((module, target) for module, targets in internal.items() for target in targets)
    return Counter((package_of(module), package_of(target)) for module, target in pairs)


def listing(
    internal: Mapping[str, set[str]], third_party: Mapping[str, set[str]], violations: Sequence[Violation]
) -> str:
    """The text report: packages, package edges with counts, third-party names, broken rules."""
    sizes = Counter(package_of(module) for module in internal)
    broken = {(package_of(v.module), package_of(v.imported)) for v in violations}
    lines = ["Packages: " + ", ".join(f"{name} ({count} modules)" for name, count in sorted(sizes.items()))]
    lines.append("Package imports (A -> B: module-to-module imports):")
    for (source, target), count in sorted(package_edges(internal).items()):
        flag = "   BREAKS A RULE" if (source, target) in broken else ""
        lines.append(f"  {source:>10} -> {target:<10} {count:3d}{flag}")
    lines.append("Third-party imports:")
    for package in sorted(sizes):
        names = set().union(*(names for module, names in third_party.items() if package_of(module) == package))
        lines.append(f"  {package}: {', '.join(sorted(names)) or '-'}")
    lines.append("Rule-breaking imports:" + ("" if violations else " none"))
    lines.extend(f"  {v.module} -> {v.imported}   ({v.rule})" for v in violations)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The picture

PALETTE = ("#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#e377c2")
BROKEN = "#d62728"


def _package_order(packages: Iterable[str]) -> list[str]:
    """Layer first, then torch_ref before jax_impl, then by name: the order of columns and colours."""
    preferred = ["common", "torch_ref", "jax_impl"]
    return sorted(packages, key=lambda p: (layer_of(p), preferred.index(p) if p in preferred else 9, p))


Point = tuple[float, float]


def _edge_point(center: Point, half: Point, toward: Point) -> Point:
    """Where the line from a box's center toward a point leaves the box (so arrows touch, not overlap)."""
    dx, dy = toward[0] - center[0], toward[1] - center[1]
    scale = min(half[0] / abs(dx) if dx else math.inf, half[1] / abs(dy) if dy else math.inf)
    return center[0] + dx * scale, center[1] + dy * scale


def _depths(modules: Sequence[str], internal: Mapping[str, set[str]]) -> dict[str, int]:
    """Longest chain of same-package imports below each module, so importers sit above imports."""
    depth: dict[str, int] = {}
    members = set(modules)

    def visit(module: str, seen: frozenset[str]) -> int:
        if module not in depth:
            below = [visit(t, seen | {module}) for t in internal.get(module, ()) if t in members and t not in seen]
            depth[module] = 1 + max(below, default=-1)
        return depth[module]

    for module in modules:
        visit(module, frozenset())
    return depth


def _draw_packages(
    ax: Axes,
    internal: Mapping[str, set[str]],
    third_party: Mapping[str, set[str]],
    violations: Sequence[Violation],
    colours: Mapping[str, str],
) -> None:
    """Left panel: one box per package, layers bottom to top, an arrow per package edge."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    packages = _package_order({package_of(m) for m in internal})
    by_layer: dict[int, list[str]] = {}
    for package in packages:
        by_layer.setdefault(layer_of(package), []).append(package)
    half = (1.1, 0.42)
    centers = {
        package: ((i - (len(row) - 1) / 2) * 2.9, layer * 2.4)
        for layer, row in by_layer.items()
        for i, package in enumerate(row)
    }
    edges = package_edges(internal)
    broken_names: dict[str, list[str]] = {}
    for v in violations:
        if v.imported not in internal:  # a third-party name
            broken_names.setdefault(package_of(v.module), []).append(f"{v.imported} ({v.module})")
    for package, (x, y) in centers.items():
        members = [m for m in internal if package_of(m) == package]
        used = set().union(*(third_party[m] for m in members))
        ax.add_patch(FancyBboxPatch((x - half[0], y - half[1]), 2 * half[0], 2 * half[1],
                                    boxstyle="round,pad=0.02", fc="white", ec=colours[package], lw=2, zorder=3))
        ax.text(x, y + 0.17, package, ha="center", va="center", fontsize=12, weight="bold", zorder=4)
        inside = edges.get((package, package), 0)
        ax.text(x, y - 0.1, f"{len(members)} modules; {inside} imports inside", ha="center", va="center",
                fontsize=8, zorder=4)
        ax.text(x, y - 0.28, ", ".join(sorted(used)) or "no third-party imports", ha="center", va="center",
                fontsize=6.5, color="#555555", zorder=4)
        if package in broken_names:
            ax.text(x, y - half[1] - 0.12, "forbidden: " + "; ".join(sorted(broken_names[package])),
                    ha="center", va="top", fontsize=7, color=BROKEN, zorder=4)
    broken = {(package_of(v.module), package_of(v.imported)) for v in violations if v.imported in internal}
    for (source, target), count in edges.items():
        if source == target:
            continue
        start = _edge_point(centers[source], half, centers[target])
        end = _edge_point(centers[target], half, centers[source])
        rad = 0.2 if (target, source) in edges else 0.0
        colour = BROKEN if (source, target) in broken else colours[source]
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, color=colour,
                                     lw=1 + 0.5 * math.sqrt(count), connectionstyle=f"arc3,rad={rad}", zorder=2))
        # the middle of the arc3 curve: the chord's midpoint pushed sideways by rad / 2 of the chord
        middle = ((start[0] + end[0]) / 2 + rad / 2 * (end[1] - start[1]),
                  (start[1] + end[1]) / 2 - rad / 2 * (end[0] - start[0]))
        ax.text(*middle, str(count), ha="center", va="center", fontsize=9,
                color=colour, bbox={"fc": "white", "ec": "none", "pad": 1}, zorder=4)
    xs = [x for x, _ in centers.values()]
    ys = [y for _, y in centers.values()]
    ax.set_xlim(min(xs) - 1.6, max(xs) + 1.6)
    ax.set_ylim(min(ys) - 1.2, max(ys) + 1.0)
    ax.set_title("Packages (arrow A → B: A imports B; number = module-to-module imports)", fontsize=10)
    ax.axis("off")


def _draw_modules(
    ax: Axes, internal: Mapping[str, set[str]], violations: Sequence[Violation], colours: Mapping[str, str]
) -> None:
    """Right panel: one box per module, a column per layer (common first), importers above imports."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

    packages = _package_order({package_of(m) for m in internal})
    half, column_gap, package_gap = (1.05, 0.34), 4.6, 1.6
    position: dict[str, tuple[float, float]] = {}
    for layer in sorted({layer_of(p) for p in packages}):
        y = 0.0
        for package in [p for p in packages if layer_of(p) == layer]:
            members = [m for m in internal if package_of(m) == package]
            depth = _depths(members, internal)
            ordered = sorted(members, key=lambda m: (-depth[m], m))
            top = y
            for module in ordered:
                position[module] = (layer * column_gap, y)
                y -= 1.0
            x = layer * column_gap
            ax.add_patch(Rectangle((x - half[0] - 0.2, y + 0.5), 2 * half[0] + 0.4, top - y + 0.1,
                                   fc=colours[package], alpha=0.07, ec=colours[package], lw=1, zorder=0))
            ax.text(x, top + 0.75, package, ha="center", va="bottom", fontsize=10, weight="bold",
                    color=colours[package])
            y -= package_gap
    broken = {(v.module, v.imported) for v in violations}
    for module, (x, y) in position.items():
        ax.add_patch(FancyBboxPatch((x - half[0], y - half[1]), 2 * half[0], 2 * half[1], boxstyle="round,pad=0.02",
                                    fc="white", ec=colours[package_of(module)], lw=0.8, zorder=3))
        short = module.split(".", 1)[1] if "." in module else "__init__"
        ax.text(x, y, short, ha="center", va="center", fontsize=6.5, zorder=4)
    for module, targets in internal.items():
        for target in sorted(targets):
            (x0, y0), (x1, y1) = position[module], position[target]
            is_broken = (module, target) in broken
            colour = BROKEN if is_broken else colours[package_of(module)]
            if x0 == x1:  # same column: an arc beside it (left of common, right of the others)
                side = -1.0 if x0 == 0 else 1.0
                start, end = (x0 + side * half[0], y0), (x1 + side * half[0], y1)
                rad = side * math.copysign(min(0.5, 0.9 / math.sqrt(abs(y1 - y0))), y1 - y0)
            else:  # to another column: from the facing sides (leftward unless a rule is broken)
                side = -1.0 if x1 < x0 else 1.0
                start, end, rad = (x0 + side * half[0], y0), (x1 - side * half[0], y1), 0.0
            ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=7, color=colour,
                                         lw=1.6 if is_broken else 0.6, alpha=1.0 if is_broken else 0.55,
                                         connectionstyle=f"arc3,rad={rad}", zorder=5 if is_broken else 1))
    xs = [x for x, _ in position.values()]
    ys = [y for _, y in position.values()]
    ax.set_xlim(min(xs) - 3.2, max(xs) + 3.2)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 1.4)
    handles = [Line2D([], [], color=colours[p], lw=1.5, label=f"imports by {p}") for p in packages]
    handles.append(Line2D([], [], color=BROKEN, lw=2, label="breaks a rule"))
    ax.legend(handles=handles, loc="lower left", fontsize=8, frameon=False)
    ax.set_title("Modules (columns by layer; an arrow points from the importer to the imported module)",
                 fontsize=10)
    ax.axis("off")


def draw(
    internal: Mapping[str, set[str]],
    third_party: Mapping[str, set[str]],
    out: Path,
    notes: Sequence[str] = DEFAULT_NOTES,
) -> None:
    """Write the two-panel PNG: packages on the left, modules on the right, the rules beneath."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window; chosen here so importing this module is cheap
    import matplotlib.pyplot as plt

    violations = find_violations(internal, third_party)
    packages = _package_order({package_of(m) for m in internal})
    colours = {package: PALETTE[i % len(PALETTE)] for i, package in enumerate(packages)}
    rows = max(Counter(layer_of(package_of(m)) for m in internal).values(), default=1) + 2 * len(packages)
    figure, (left, right) = plt.subplots(1, 2, figsize=(17, max(9.0, 0.3 * rows + 3)),
                                         gridspec_kw={"width_ratios": [0.85, 1.4]})
    _draw_packages(left, internal, third_party, violations, colours)
    _draw_modules(right, internal, violations, colours)
    footer = list(notes)
    if violations:
        shown = "; ".join(f"{v.module} → {v.imported}" for v in violations[:6])
        more = f" (+{len(violations) - 6} more)" if len(violations) > 6 else ""
        footer.append(f"Breaking these rules now: {shown}{more}")
    bottom = 0.02 + 0.028 * len(footer)
    for i, line in enumerate(footer):
        colour = BROKEN if i >= len(notes) else "black"
        figure.text(0.02, bottom - 0.028 * (i + 1) + 0.01, line, fontsize=10, color=colour, ha="left")
    figure.subplots_adjust(left=0.01, right=0.99, top=0.96, bottom=bottom + 0.02, wspace=0.02)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    """Read the graph under --root, print the listing, write the picture to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the repository root (default: the one holding this script)")
    parser.add_argument("--out", type=Path, default=None, help="the PNG to write (default: ROOT/docs/architecture.png)")
    parser.add_argument("--note", action="append", default=None,
                        help="a line printed under the picture (repeatable; default: the three layering rules)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    internal, third_party = module_imports(root), third_party_imports(root)
    print(listing(internal, third_party, find_violations(internal, third_party)))
    out = args.out if args.out is not None else root / "docs" / "architecture.png"
    draw(internal, third_party, out, args.note or DEFAULT_NOTES)
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
