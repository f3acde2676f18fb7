"""Shared fixtures: a fake pooling hub module, tiny solid-colour datasets, a temp MLflow store.

Modelled on TF Hub's make_image_classifier_test: a SavedModel that pools colours
stands in for a real backbone, and a few solid-colour JPEGs per label make a task
a linear head must solve.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    """Built-in backbones are built once per test session: one per-user-style cache for every test and
    every process they start (not the real ~/.cache, which a test run must not depend on or fill)."""
    import tempfile

    if not os.environ.get("PYTEST_XDIST_WORKER"):  # a worker (pytest -n) shares its controller's cache
        os.environ["MLTAG_BACKBONE_CACHE"] = tempfile.mkdtemp(prefix="mltag-test-backbones-")
    os.environ.pop("XDG_CACHE_HOME", None)
    # matplotlib's first import on a machine lists its fonts with fontconfig's `fc-list` (a process) and caches the
    # list; built here, before any test, so a unit test that draws a plot is not the first and starts no process.
    import matplotlib.font_manager  # noqa: F401


def pytest_unconfigure(config):
    import shutil

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(os.environ.get("MLTAG_BACKBONE_CACHE", "/nonexistent"), ignore_errors=True)


REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue"]

# The files that take longest, longest first (one worker's seconds, in benchmarks/README.md's table). `make test`
# runs `--dist loadfile --no-loadscope-reorder`: xdist hands out whole files in collection order, so the long ones
# start first and the short ones fill in at the end, and the two workers finish together (by count of tests, the
# default order, the longest file could start last). test_faults (the stand-in backbone) starts beside test_backbone,
# not test_e2e_dvc: that would wait idle on the lock while test_backbone builds Lite0, which both need.
LONGEST_FIRST = ("integration/test_backbone.py", "e2e/test_faults.py", "e2e/test_e2e_dvc.py", "e2e/test_pipeline.py",
                 "integration/test_finetune.py", "e2e/test_mlflow_server.py", "integration/test_steps.py",
                 "e2e/test_registry_faults.py", "integration/test_engine.py", "integration/test_review.py")


def pytest_collection_modifyitems(config, items):
    rank = {REPO / "tests" / f: i for i, f in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path, len(rank)))  # stable: every file's tests keep their order



def save_pooling_module(path: Path) -> Path:
    """A TF2 SavedModel: float images [B,H,W,3] in [0,1] -> [B,6] (mean and 1-mean per channel)."""
    import tensorflow as tf

    class Pool(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            m = tf.reduce_mean(images, axis=[1, 2])
            return tf.concat([m, 1.0 - m], axis=1)

    tf.saved_model.save(Pool(), str(path))
    return path


@pytest.fixture(scope="session")
def fake_backbone(tmp_path_factory) -> Path:
    return save_pooling_module(tmp_path_factory.mktemp("hub") / "pool")


def colour_image(flags, rng, size=24) -> Image.Image:
    base = np.array([230 if f else 20 for f in flags], np.float64)
    arr = np.clip(base + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_colour_dataset(root: Path, n: int = 48, seed: int = 0, start: int = 0) -> list[tuple[str, tuple]]:
    """Write ``n`` JPEGs under root/images and return (relative path, flags) rows."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        while True:
            flags = tuple(int(x) for x in rng.random(3) < 0.45)
            if 1 <= sum(flags) <= 2:
                break
        rel = f"images/{i:04d}.jpg"
        colour_image(flags, rng).save(root / rel, "JPEG", quality=90)
        rows.append((rel, flags))
    return rows


def write_lst_dataset(root: Path, rows) -> Path:
    (root / "labels.txt").write_text("\n".join(COLOURS) + "\n")
    lines = ["\t".join([str(i), *map(str, f), p]) for i, (p, f) in enumerate(rows)]
    (root / "all.lst").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def colour_dataset(tmp_path) -> Path:
    root = tmp_path / "colours"
    write_lst_dataset(root, make_colour_dataset(root))
    return root


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A SQLite MLflow store under tmp_path; fails the test if it leaks an active run."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    # Every test resets mlflow's process-wide URIs after itself (_mlflow_uris_do_not_leak), but a module fixture that
    # ran a step in process since then left them on its store: this test's MlflowClient() would read that one while
    # its subprocesses log to this one.
    reset_mlflow_uris()
    uri = blank_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    leaked = mlflow.active_run()
    while mlflow.active_run():
        mlflow.end_run()
    assert leaked is None, "a test left an MLflow run open"


_BLANK_STORE: list[Path] = []


def blank_store(path: Path) -> str:
    """An empty MLflow SQLite store at ``path`` and its URI: a copy of one made once per test process, because
    making one runs MLflow's schema migrations (2.4 s of CPU in every step process or server that would make it).
    The copy is what MLflow itself makes: the same tables, the same default experiment."""
    import shutil
    import tempfile

    if not _BLANK_STORE:
        made = Path(tempfile.mkdtemp(prefix="mltag-blank-store-")) / "mlflow.db"
        subprocess.run([sys.executable, "-c", "import sys; from mlflow import MlflowClient; "
                        "MlflowClient(tracking_uri=sys.argv[1]).search_experiments()", f"sqlite:///{made}"],
                       check=True, capture_output=True, timeout=300)
        import atexit

        atexit.register(shutil.rmtree, made.parent, True)
        _BLANK_STORE.append(made)
    path = Path(path)
    assert not path.exists(), f"{path} exists"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_BLANK_STORE[0], path)
    return f"sqlite:///{path}"


def is_blank_store(path: Path) -> bool:
    """Whether ``path`` is still the blank store ``blank_store`` copied there (nothing logged into it since)."""
    import filecmp

    return bool(_BLANK_STORE) and filecmp.cmp(_BLANK_STORE[0], path, shallow=False)


def reset_mlflow_uris() -> None:
    """Steps called in-process point mlflow's process-wide URIs at this test's store; later tests must
    not inherit a store that no longer exists (mlflow has no public way to unset the registry URI)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils

    mlflow.set_tracking_uri(None)
    registry_utils._registry_uri = None
    os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set_registry_uri exports it for subprocesses


def run_cli(*args, cwd=None, env=None, check=True, timeout=900) -> subprocess.CompletedProcess:
    """Run ``mltag`` in a fresh process (the installed console script's module)."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "mltag.cli", *args], cwd=cwd, env=e, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"mltag {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[str, list]:
    """The Kubeflow pipeline compiled from the committed params.yaml: its text and its YAML documents."""
    import yaml

    from mltag.config import load_params
    from mltag.kubeflow.run import compile_pipeline

    out = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    env_image = os.environ.pop("MLTAG_IMAGE", None)
    try:
        compile_pipeline(out, load_params(REPO / "params.yaml"), allow_dirty=True)
    finally:
        if env_image is not None:
            os.environ["MLTAG_IMAGE"] = env_image
    text = out.read_text()
    return text, list(yaml.safe_load_all(text))


@pytest.fixture(autouse=True)
def _mlflow_uris_do_not_leak():
    """A test that runs a step in this process points mlflow's process-wide URIs (and MLFLOW_REGISTRY_URI, which
    set_registry_uri exports) at its own store; the next test on this worker, and every `mltag` it starts, would
    inherit them and register into that store instead of its own. Reset after every test, whatever it did."""
    yield
    if "mlflow" in sys.modules:
        reset_mlflow_uris()


@pytest.fixture(autouse=True)
def _unit_tier_starts_no_process(request, monkeypatch):
    """The unit tier starts no process: a test there that does belongs in tests/integration or tests/e2e."""
    if "unit" not in request.node.path.relative_to(REPO / "tests").parts[:1]:
        return

    def refuse(*args, **kwargs):
        raise AssertionError("a unit test starts no process (subprocess, fork): move it to tests/integration")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(os, "fork", refuse)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
