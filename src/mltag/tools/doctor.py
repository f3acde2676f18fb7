"""``mltag doctor``: what this machine can do, and what would make a run fail, before a long run.

Each check prints one line: ``ok``, ``warn`` (a run works, but slower or with less than
it could) or ``FAIL`` (a run would fail), with what to do about it. The exit status is
2 when any check fails.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mltag.errors import MltagError
from mltag.workers import cpu_threads

PACKAGES = ("mltag", "tensorflow", "tf-keras", "tensorflow-hub", "ai-edge-litert", "numpy", "pillow", "mlflow", "kfp",
            "dvc")
REQUIRED = ("tensorflow", "tensorflow-hub", "ai-edge-litert", "numpy", "pillow", "mlflow")


@dataclass
class Check:
    level: str  # ok, warn or FAIL
    what: str
    detail: str

    def line(self) -> str:
        return f"  {self.level:<5} {self.what:<10} {self.detail}"


def run_checks(params, tracking_uri: str | None = None, measure: bool = True, project: str | os.PathLike = "."):
    """Every check, in the order printed, each as soon as it is done."""
    project = Path(project)
    yield _packages()
    yield _cpu()
    yield from _engines(params, measure)
    yield _gpu()
    yield _tracking(tracking_uri)
    yield _store(params.bottleneck.cache_dir, project)
    yield _outputs(project)
    yield _backbone_cache(params.backbone.cache_dir)
    yield _dvc(project)


def _packages() -> Check:
    from importlib.metadata import PackageNotFoundError, version

    found, missing = [], []
    for name in PACKAGES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            missing.append(name)
    text = f"Python {platform.python_version()}, " + ", ".join(found)
    needed = [m for m in missing if m in REQUIRED]
    if needed:
        return Check("FAIL", "packages", f"{', '.join(needed)} missing: pip install 'mltag' (or `make install`) "
                                         f"installs them; found {text}")
    optional = [m for m in missing if m not in REQUIRED]
    if optional:
        return Check("warn", "packages", f"{text}; not installed: {', '.join(optional)} (pip install "
                                         "'mltag[kubeflow,dvc]' for the pipeline and dvc repro)")
    return Check("ok", "packages", text)


def cpu_info() -> dict:
    """The CPU's model name, usable cores and SIMD flags (Linux: /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": cpu_threads(), "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "neon": "asimd" in flags or "neon" in flags}


def _cpu() -> Check:
    c = cpu_info()
    simd = f"AVX2 {'yes' if c['avx2'] else 'no'}, AVX-512 {'yes' if c['avx512'] else 'no'}"
    text = f"{c['model']}, {c['cores']} usable core(s), {simd}"
    if platform.machine() in ("x86_64", "AMD64") and not c["avx2"]:
        return Check("warn", "cpu", f"{text}: without AVX2 the backbone runs several times slower")
    return Check("ok", "cpu", text)


def _engines(params, measure: bool) -> list[Check]:
    from mltag.backbones import builtin as bb
    from mltag.inference.engine import backbone_engine, resolve_engine, tflite_path

    out = []
    try:
        engine = resolve_engine(params.bottleneck.engine)
    except MltagError as e:
        return [Check("FAIL", "engines", str(e))]
    train = "TensorFlow (fine-tune)" if params.train.mode == "fine_tune" else "numpy (head on cached vectors)"
    out.append(Check("ok", "engines", f"bottleneck {'LiteRT (XNNPACK)' if engine == 'litert' else 'TensorFlow'}, "
                                      f"train {train}, evaluate/predict/serving LiteRT on CPU"))
    handle = params.backbone.handle
    size = params.backbone.image_size or bb.default_image_size(handle)
    try:
        resolved = bb.resolve(handle, params.backbone.cache_dir, build=False)
    except MltagError as e:
        msg = str(e)
        if "not built yet" in msg:
            return out + [Check("warn", "forward", f"{handle} is not built yet: the first run builds and converts it "
                                                   "(20-40 s, once per user); `mltag backbone build "
                                                   f"{handle.removeprefix('builtin:')}` does it now")]
        return out + [Check("FAIL", "forward", f"backbone.handle: {msg}")]
    if not measure:
        return out
    if engine == "litert" and not tflite_path(resolved, size, params.backbone.cache_dir).is_file():
        return out + [Check("warn", "forward", f"{handle} is built but not yet converted for LiteRT: the first run "
                                               "converts it (about 10 s, once)")]
    import numpy as np

    try:
        eng = backbone_engine(engine, resolved, size, params.backbone.cache_dir)
        px = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8)
        eng(px[:2])  # warm-up
        t0 = time.perf_counter()
        eng(px)
        rate = 16 / (time.perf_counter() - t0)
    except (MltagError, RuntimeError, ValueError) as e:
        return out + [Check("FAIL", "forward", f"{handle} does not run: {e}")]
    return out + [Check("ok", "forward", f"{handle} at {size} px through {eng.name}: {rate:.0f} img/s on 16 images "
                                         f"(one view; the bottleneck step reaches about 0.9x this)")]


def _gpu() -> Check:
    from mltag.inference.engine import gpu_missing_reason

    why = gpu_missing_reason()
    if why is None:
        return Check("ok", "gpu", "TensorFlow sees a GPU: bottleneck.engine auto and fine-tuning use it")
    reason = why.split(":")[0].split(" (")[0]
    return Check("ok", "gpu", f"none usable: {reason}; CPU only, fine for the default head mode")


def _tracking(explicit: str | None) -> Check:
    from mltag.tracking import runs as tracking

    uri = tracking.tracking_uri(explicit)
    shown = tracking.mask_uri(uri)
    if uri.startswith(("http://", "https://")):
        try:
            tracking.check_reachable(uri, timeout=3)
        except MltagError as e:
            return Check("FAIL", "tracking", f"{e}".split(". Start it")[0] + ": start the server, or point "
                                             "MLFLOW_TRACKING_URI (or --tracking-uri) at a live one")
        return Check("ok", "tracking", f"{shown} answers")
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        problem = _unwritable(db.parent)
        if problem:
            return Check("FAIL", "tracking", f"{shown}: cannot write its folder {db.parent} ({problem}): set "
                                             "MLFLOW_TRACKING_URI to a writable store")
        return Check("ok", "tracking", f"{shown} ({'exists' if db.is_file() else 'created on first use'})")
    return Check("ok", "tracking", f"{shown} (not checked: only http(s) and sqlite stores are)")


def _unwritable(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (made if missing), or None."""
    probe = None
    try:
        existing = folder
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is a file, not a folder"
        if existing != folder:
            return None if os.access(existing, os.W_OK) else f"{existing} is not writable"
        fd, probe = tempfile.mkstemp(prefix=".mltag-doctor.", dir=folder)
        os.close(fd)
    except OSError as e:
        return e.strerror or str(e)
    finally:
        if probe:
            Path(probe).unlink(missing_ok=True)
    return None


def _store(store: str, project: Path) -> Check:
    if "://" in store:
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(store)
            if fs.exists(path):
                fs.ls(path)
        except Exception as e:  # noqa: BLE001 - any filesystem error means "cannot use it"
            return Check("FAIL", "store", f"vector store {store}: {type(e).__name__}: {str(e)[:150]} (install its "
                                          "fsspec package, check the credentials)")
        return Check("ok", "store", f"vector store {store} reachable")
    folder = Path(store) if Path(store).is_absolute() else project / store
    problem = _unwritable(folder)
    if problem:
        return Check("FAIL", "store", f"vector store {folder}: {problem}: fix its permissions or set "
                                      "bottleneck.cache_dir to a writable folder")
    return Check("ok", "store", f"vector store {folder} writable")


def _outputs(project: Path) -> Check:
    bad = [(name, p) for name in ("data", "models", "metrics", "reports", "plots")
           if (p := _unwritable(project / name))]
    if bad:
        name, why = bad[0]
        return Check("FAIL", "outputs", f"{project / name}: {why}: the steps write there; fix its permissions "
                                        "(or run from a writable project folder)")
    return Check("ok", "outputs", f"data/, models/, metrics/, reports/, plots/ in {project.resolve()} writable")


def _backbone_cache(cache_dir: str) -> Check:
    from mltag.backbones.builtin import cache_root

    root = cache_root(cache_dir)
    problem = _unwritable(root)
    if problem:
        return Check("FAIL", "backbones", f"backbone cache {root}: {problem}: set backbone.cache_dir or "
                                          "MLTAG_BACKBONE_CACHE to a writable folder")
    built = sorted(p.name for p in root.iterdir() if (p / "saved_model.pb").is_file()) if root.is_dir() else []
    return Check("ok", "backbones", f"cache {root} writable; built: {', '.join(built) or 'none yet'}")


def _dvc(project: Path) -> Check:
    if not (project / ".dvc").is_dir():
        return Check("warn", "dvc", f"{project.resolve()} is not a DVC project: `dvc repro` needs `git init && dvc "
                                    "init` (the steps and `mltag pipeline run` work without it)")
    exe = shutil.which("dvc")
    if exe is None:
        return Check("warn", "dvc", "a DVC project, but the dvc command is not installed: pip install 'mltag[dvc]'")
    try:
        p = subprocess.run([exe, "status", "--quiet"], cwd=project, capture_output=True, text=True, timeout=25)
    except subprocess.TimeoutExpired:
        return Check("warn", "dvc", "`dvc status` took over 25 s; not checked")
    if p.returncode == 0:
        return Check("ok", "dvc", "DVC project; every stage is up to date")
    if p.returncode == 1:
        return Check("ok", "dvc", "DVC project; some stages changed since the last `dvc repro` (it reruns them)")
    err = (p.stderr or p.stdout).strip().splitlines()
    return Check("FAIL", "dvc", f"`dvc status` fails: {err[-1][:200] if err else p.returncode}: fix dvc.yaml or "
                                "params.yaml first")


def doctor(params, tracking_uri: str | None = None, measure: bool = True, project: str | os.PathLike = ".",
           params_problem: str | None = None) -> int:
    """Print every check; return 2 when a run would fail, else 0."""
    t0 = time.time()
    print("mltag doctor")
    checks = []
    if params_problem:
        checks.append(Check("FAIL", "params", f"{params_problem} (checked the rest with the defaults)"))
        print(checks[-1].line(), flush=True)
    for c in run_checks(params, tracking_uri, measure, project):
        print(c.line(), flush=True)
        checks.append(c)
    failed = [c for c in checks if c.level == "FAIL"]
    warned = [c for c in checks if c.level == "warn"]
    verdict = (f"{len(failed)} problem(s) that would make a run fail" if failed else "a run should work") + \
        (f", {len(warned)} warning(s)" if warned else "")
    print(f"doctor: {verdict} ({time.time() - t0:.0f} s)")
    return 2 if failed else 0
