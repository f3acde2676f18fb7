"""The code layout the README states, kept true: no step module imports another, and the shared
modules import no step module (so no step reaches another through them)."""

from __future__ import annotations

import ast

from conftest import REPO

SRC = REPO / "src" / "mltag"
# A step (or command) module: its own work only. Runners (cli, steps, kubeflow) call them.
STEPS = {"mltag.demo", "mltag.prepare", "mltag.bottleneck", "mltag.train", "mltag.evaluate", "mltag.calibrate",
         "mltag.register", "mltag.review", "mltag.predict", "mltag.suggest", "mltag.doctor"}
RUNNERS = ("mltag.cli", "mltag.steps", "mltag.kubeflow")


def _module_name(path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _step_of(module: str) -> str | None:
    """The step a module belongs to (``mltag.prepare.checks`` -> ``mltag.prepare``), or None."""
    return next((s for s in STEPS if module == s or module.startswith(s + ".")), None)


def _imports(path) -> set[str]:
    """Every mltag module ``path`` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mltag")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mltag"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from mltag import train`
    return out


def test_no_step_module_imports_another_and_shared_modules_import_no_step():
    bad = []
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 30
    for path in modules:
        name = _module_name(path)
        if name.startswith(RUNNERS):
            continue
        mine = _step_of(name)
        for imported in _imports(path):
            other = _step_of(imported)
            if other is not None and other != mine:
                bad.append(f"{name} imports {imported}")
    assert not bad, "\n".join(bad)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from mltag.train import train\n    from mltag import evaluate\n")
    assert {"mltag.train", "mltag.evaluate"} <= {_step_of(m) for m in _imports(f)}
