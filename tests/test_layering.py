"""The package layering of DESIGN.md §1: a package imports only packages of its own or a lower
layer, and no two packages import each other (directly or round a longer circle).

Every `import` in every module counts, function-level ones too: an upward import hidden in
a function is still an upward dependency. The checker runs over a small fixture tree as
well, so a broken checker cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# DESIGN.md §1, bottom up. Packages of one layer may import each other (without a circle).
LAYERS: list[set[str]] = [
    {"core"},
    {"ops"},
    {"compiler"},
    {"runtime"},
    {"distributed"},
    {"nn", "optim", "data", "amp", "checkpoint", "metrics"},
    {"ps"},
    {"parallel"},
    {"models", "ctr", "ml", "automl", "gnn"},
    {"train"},
    {"serving", "onnx", "cli", "dist"},  # dist: the deprecated alias of distributed + parallel
]


def package_of(module: str, top: str) -> str | None:
    """'luoshu.ps.server' -> 'ps'; the top package itself (its __init__) -> None."""
    parts = module.split(".")
    if parts[0] != top or len(parts) == 1:
        return None
    return parts[1]


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[tuple[str, int]]:
    """Every module `path` imports (absolute names), with the line, function-level ones too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from luoshu import ps` names a package in the alias
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def check_layers(root: Path, top: str, layers: list[set[str]]) -> list[str]:
    """Problems found in the package `root / top`: upward imports, unknown packages, circles."""
    layer_of = {pkg: i for i, group in enumerate(layers) for pkg in group}
    problems: list[str] = []
    edges: dict[str, dict[str, str]] = {}
    for path in sorted((root / top).rglob("*.py")):
        module = module_name(path, root)
        source = package_of(module, top)
        if source is None:
            continue  # the top package's __init__ re-exports everything
        if source not in layer_of:
            problems.append(f"{module}: package {source!r} is in no layer")
            continue
        targets = {(package_of(name, top), line) for name, line in imports_of(path, module)}
        for target, line in sorted(targets, key=lambda t: (t[1], str(t[0]))):
            if target is None or target == source:
                continue
            if target not in layer_of:
                if (root / top / target).is_dir() or (root / top / f"{target}.py").is_file():
                    problems.append(f"{module}:{line} imports {target!r}, which is in no layer")
                continue  # a name imported from the top package, not a package
            if layer_of[target] > layer_of[source]:
                problems.append(f"{module}:{line} imports {top}.{target} (layer {layer_of[target]}) from layer "
                                f"{layer_of[source]} ({source}): lower layers never import higher ones")
            edges.setdefault(source, {}).setdefault(target, f"{module}:{line}")
    problems += [f"import circle: {c}" for c in _circles(edges)]
    return problems


def _circles(edges: dict[str, dict[str, str]]) -> list[str]:
    """Each package-level import circle once, with where each step imports."""
    found, seen = [], set()

    def visit(node, path):
        for nxt, where in edges.get(node, {}).items():
            if nxt == path[0][0]:
                circle = path + [(nxt, where)]
                key = frozenset(p for p, _ in circle)
                if key not in seen:
                    seen.add(key)
                    found.append(" -> ".join(f"{p} ({w})" if w else p for p, w in circle))
            elif nxt not in (p for p, _ in path) and nxt > path[0][0]:
                visit(nxt, path + [(nxt, where)])

    for start in sorted(edges):
        visit(start, [(start, "")])
    return found


def test_luoshu_imports_only_downward_and_without_circles():
    assert check_layers(ROOT, "luoshu", LAYERS) == []


@pytest.mark.parametrize("lower, higher", [("core", "ops"), ("distributed", "nn"), ("distributed", "optim"),
                                           ("distributed", "ps"), ("distributed", "parallel")])
def test_named_boundaries_hold(lower, higher):
    """DESIGN.md's sharpest edges, said outright: core imports no other luoshu package, and
    distributed knows processes, not models."""
    index = {pkg: i for i, group in enumerate(LAYERS) for pkg in group}
    assert index[lower] < index[higher]
    for path in (ROOT / "luoshu" / lower).rglob("*.py"):
        module = module_name(path, ROOT)
        for target, line in imports_of(path, module):
            assert package_of(target, "luoshu") in (None, lower) or index[package_of(target, "luoshu")] < index[
                lower], f"{module}:{line} imports {target}"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


FIXTURE_LAYERS = [{"low"}, {"mid", "side"}, {"high"}]


def test_checker_passes_a_clean_tree(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "from pkg import high\n", "pkg/low/__init__.py": "import os\n",
                      "pkg/mid/__init__.py": "from pkg.low import x\nfrom pkg import side\n",
                      "pkg/side/__init__.py": "from ..low import y\n", "pkg/high/a.py": "import pkg.mid.b\n"})
    assert check_layers(tmp_path, "pkg", FIXTURE_LAYERS) == []


def test_checker_finds_an_upward_import_even_inside_a_function(tmp_path):
    _write(tmp_path, {"pkg/low/__init__.py": "def f():\n    from pkg.high import thing\n",
                      "pkg/high/__init__.py": ""})
    problems = check_layers(tmp_path, "pkg", FIXTURE_LAYERS)
    assert len(problems) == 1 and "pkg.low:2 imports pkg.high" in problems[0], problems


def test_checker_finds_relative_and_from_package_imports(tmp_path):
    _write(tmp_path, {"pkg/low/a.py": "from ..mid import b\n", "pkg/low/c.py": "from pkg import high\n",
                      "pkg/mid/b.py": "", "pkg/high/__init__.py": ""})
    problems = check_layers(tmp_path, "pkg", FIXTURE_LAYERS)
    assert any("pkg.low.a:1 imports pkg.mid" in p for p in problems), problems
    assert any("pkg.low.c:1 imports pkg.high" in p for p in problems), problems


def test_checker_finds_a_circle_within_a_layer(tmp_path):
    _write(tmp_path, {"pkg/mid/__init__.py": "from pkg.side import s\n",
                      "pkg/side/__init__.py": "def g():\n    import pkg.mid\n"})
    problems = check_layers(tmp_path, "pkg", FIXTURE_LAYERS)
    assert len(problems) == 1 and problems[0].startswith("import circle: mid") and "side" in problems[0], problems


def test_checker_refuses_a_package_in_no_layer(tmp_path):
    _write(tmp_path, {"pkg/stray/__init__.py": "import pkg.low\n", "pkg/low/__init__.py": ""})
    assert check_layers(tmp_path, "pkg", FIXTURE_LAYERS) == ["pkg.stray: package 'stray' is in no layer"]
