"""The code layout docs/architecture.md states, kept true.

mltag's modules are grouped by job in subpackages, in layers that only import downward; no
step module imports another step, and no tool imports another tool.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "mltag"

# Top to bottom. A module may import its own group and any group of a lower layer.
LAYERS: list[tuple[str, set[str]]] = [
    ("the command line", {"cli"}),
    ("Kubeflow", {"kubeflow"}),
    ("steps and tools", {"steps", "tools"}),
    ("registry", {"registry"}),
    ("inference", {"inference"}),
    ("parts", {"backbones", "head", "tracking", "reports"}),
    ("data", {"data"}),
    ("base", {"base"}),
]
# The base layer's modules: config, errors and small utilities, free to use each other.
BASE = {"config", "errors", "files", "workers", "tf_runtime", "metrics", "logs", "__init__"}
# Kept only so that versions registered before the move still load (see its docstring).
COMPAT = {"pyfunc": "registry"}
# Inside these groups each module stands alone: a step (or tool) never imports a sibling.
# Their private helpers (a package's own modules, fine-tuning for train) are the exception.
ISOLATED = {"steps", "tools"}
HELPERS = {"steps.finetune": {"steps.train"}}
BOTTOM_MAX_MODULES = 10  # "config, errors and small utilities": the top of src/mltag stays short


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _group(module: str) -> str:
    first = module.split(".")[0]
    return "base" if first in BASE else COMPAT.get(module, first)


def _layer(group: str) -> int:
    for i, (_, groups) in enumerate(LAYERS):
        if group in groups:
            return i
    raise AssertionError(f"group {group!r} is in no layer: add it to LAYERS in {__file__}")


def _unit(module: str) -> str:
    """A step's unit: ``steps.prepare.checks`` -> ``steps.prepare``; ``steps.train`` -> itself."""
    return ".".join(module.split(".")[:2])


def _imports(path: Path) -> set[str]:
    """Every mltag module ``path`` imports, at the top or inside a function, without the ``mltag.``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name[6:] for a in node.names if a.name.startswith("mltag.")}
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "mltag" or node.module.startswith("mltag.")):
            base = node.module[6:]
            for a in node.names:  # `from mltag.steps import train` names a module; `from mltag.x import f` a function
                sub = f"{base}.{a.name}" if base else a.name
                out.add(sub if (SRC / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (SRC / sub.replace(".", "/")).is_dir() else base)
    return {m for m in out if m}


def violations(paths) -> list[str]:
    bad = []
    for path in paths:
        me = _module(path)
        for other in sorted(_imports(path)):
            g_me, g_other = _group(me), _group(other)
            if g_me == g_other:
                if g_me in ISOLATED and _unit(me) != _unit(other) and other != g_me \
                        and _unit(me) not in HELPERS.get(_unit(other), set()):
                    bad.append(f"mltag.{me} imports its sibling mltag.{other}")
            elif _layer(g_other) <= _layer(g_me):
                bad.append(f"mltag.{me} ({LAYERS[_layer(g_me)][0]}) imports mltag.{other} "
                           f"({LAYERS[_layer(g_other)][0]}): imports only run downward")
    return bad


def test_imports_run_only_downward_and_steps_stand_alone():
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 40
    assert violations(modules) == []


def test_every_module_is_in_a_declared_group_and_the_top_stays_short():
    top = [p for p in SRC.glob("*.py")]
    assert len(top) <= BOTTOM_MAX_MODULES + 2, sorted(p.name for p in top)  # + cli, pyfunc
    for path in SRC.rglob("*.py"):
        _layer(_group(_module(path)))  # raises for a module in no layer


def _violations_in_fake_tree(tmp_path, files: dict[str, str], target: str) -> list[str]:
    """Lay out a fake ``mltag`` tree under tmp_path and check one of its modules."""
    global SRC
    fake = tmp_path / "mltag"
    for rel, code in files.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(code)
    old, SRC = SRC, fake
    try:
        return violations([fake / target])
    finally:
        SRC = old


TREE = {"data/__init__.py": "", "steps/__init__.py": "", "steps/train.py": "", "steps/evaluate.py": "",
        "inference/__init__.py": "", "inference/engine.py": ""}


@pytest.mark.parametrize("code, expected", [
    ("from mltag.steps.train import train\n", "mltag.data.formats (data) imports mltag.steps.train (steps and tools)"),
    ("def f():\n    from mltag.steps import evaluate\n", "mltag.data.formats (data) imports mltag.steps.evaluate"),
    ("import mltag.inference.engine\n", "mltag.data.formats (data) imports mltag.inference.engine"),
])
def test_the_check_sees_upward_imports_also_inside_functions(tmp_path, code, expected):
    found = _violations_in_fake_tree(tmp_path, {**TREE, "data/formats.py": code}, "data/formats.py")
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_step_importing_another_step_is_caught_and_a_downward_import_is_not(tmp_path):
    files = {**TREE, "steps/calibrate.py": "from mltag.steps.evaluate import evaluate\nfrom mltag.inference import engine\n"}
    assert _violations_in_fake_tree(tmp_path, files, "steps/calibrate.py") == [
        "mltag.steps.calibrate imports its sibling mltag.steps.evaluate"]
