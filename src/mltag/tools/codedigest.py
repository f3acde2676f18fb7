"""What each step's output depends on besides its data and params: the code that runs it, and a local backbone.

``dvc.yaml``'s first stage (``code``) writes ``code_digests`` into a folder on every ``dvc repro``, one small file per
step (and ``backbone``), and every stage lists its own file under ``deps:``. So a change to the code a step runs (an edit, an upgrade of
mltag) reruns exactly the stages whose code changed, and DVC's run cache never hands back outputs that older code
made; a local SavedModel ``backbone.handle`` replaced in place reruns bottleneck and what follows. The vector store is
keyed by what the vectors depend on (image, backbone, size, preprocessing version), so a rerun bottleneck whose
vectors did not change computes nothing.

A step's code is its module and every mltag module it imports, directly or through another, at the top or inside a
function (found by reading the source, not by importing it: the digest takes a fraction of a second).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # mltag/
STEPS = ("prepare", "bottleneck", "train", "evaluate", "calibrate", "register", "review")


def _module_file(root: Path, module: str) -> Path | None:
    """The file of ``mltag.<module>`` (dotted, without the ``mltag.``) under ``root``, or None."""
    base = root.joinpath(*module.split(".")) if module else root
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imports(f: Path) -> frozenset[str]:
    """The mltag modules ``f`` imports (``from mltag.x import y`` names ``x.y`` when that is a module, else ``x``)."""
    return _imports_in(f.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=None)
def _imports_in(source: str) -> frozenset[str]:
    """``_imports`` of one source text, parsed once per process: the seven steps reach mostly the same modules."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name[6:] for a in node.names if a.name.startswith("mltag.")}
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "mltag"
                                                                     or node.module.startswith("mltag.")):
            base = node.module[6:]
            out |= {f"{base}.{a.name}" if base else a.name for a in node.names} | {base}
    return frozenset(out)


def code_files(step: str, root: Path = PACKAGE) -> list[Path]:
    """Every source file of ``root`` (the mltag package) that ``step``'s module reaches through imports."""
    start = _module_file(root, f"steps.{step}")
    if start is None:
        raise ValueError(f"no module for step {step!r} under {root}")
    seen, todo = {start}, [start]
    if start.name == "__init__.py":  # a step that is a package (prepare): all of its own modules
        seen |= set(start.parent.glob("*.py"))
        todo = sorted(seen)
    while todo:
        f = todo.pop()
        for module in _imports(f):
            g = _module_file(root, module)
            if g is not None and g not in seen:
                seen.add(g)
                todo.append(g)
    # what a reached package renders with (reports/templates/*.j2) is code too
    data = {t for f in seen if f.parent != root for t in (f.parent / "templates").rglob("*") if t.is_file()}
    return sorted(seen | data)


def _digest(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """SHA-256 over a folder's files (names and bytes): a local SavedModel's identity."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}:".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\n")
    return h.hexdigest()


def code_digests(backbone_handle: str = "", root: Path = PACKAGE) -> dict[str, str]:
    """One digest per step over the code it runs, and ``backbone``: a local backbone folder's content digest (a
    handle that is not a local folder, a built-in or a URL, is its own identity)."""
    out = {step: _digest(code_files(step, root), root) for step in STEPS}
    handle = os.path.expanduser(backbone_handle)
    out["backbone"] = folder_digest(Path(handle)) if handle and Path(handle).is_dir() else backbone_handle
    return out


def write_digests(folder: str | os.PathLike, digests: dict[str, str]) -> None:
    """One file per key in ``folder``, rewritten only when its digest changed (DVC reads them as dependencies:
    a dependency's hash is in dvc.lock, so ``dvc exp show`` lists it only when it moved)."""
    from mltag.files import write_text_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key, digest in digests.items():
        f = folder / key
        if not f.is_file() or f.read_text(encoding="utf-8") != digest + "\n":
            write_text_atomic(f, digest + "\n")
