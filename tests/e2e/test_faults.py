"""Fault injection with real processes: kill -9 at named points, damaged cache entries, hostile input,
an unreachable or stopped MLflow server. Each fault must give a clear error (exit 2, no traceback) or
be repaired, and a rerun must converge to what one clean run produces."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_mlflow_server import free_port

from conftest import is_blank_store, reset_mlflow_uris, run_cli
from mltag.config import sections
from mltag.data.store import FeatureCache
from mltag.steps.bottleneck import bottleneck
from mltag.steps.calibrate import calibrate
from mltag.steps.evaluate import evaluate
from mltag.steps.prepare import prepare
from mltag.steps.register import register
from mltag.steps.train import train


def _steps_until_register(tmp, dataset, backbone, fresh=False):
    """prepare, bottleneck, train, evaluate and calibrate of the colour set in ``tmp``, its MLflow store at
    $MLFLOW_TRACKING_URI (a SQLite file). Made once per worker and copied (``fresh``: made here, its run in that
    store from the start): ``dataset`` holds the same photos as the copy's, and prepare records them relatively."""
    if fresh:
        return _make_until_register(tmp, dataset, backbone)
    import shutil
    from urllib.parse import urlsplit

    if "until" not in _TEMPLATE:
        import atexit
        import tempfile

        from conftest import blank_store, make_colour_dataset, write_lst_dataset

        root = Path(tempfile.mkdtemp(prefix="mltag-until-register-"))
        atexit.register(shutil.rmtree, root, True)
        write_lst_dataset(root / "colours", make_colour_dataset(root / "colours"))
        old = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = blank_store(root / "mlflow.db")
        try:
            _make_until_register(root, root / "colours", backbone)
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.update(MLFLOW_TRACKING_URI=old)
            reset_mlflow_uris()  # the steps pointed mlflow's process-wide URIs at the template's store
        _TEMPLATE["until"] = root
    root = _TEMPLATE["until"]
    assert Path(dataset).name == "colours" and Path(dataset).parent == Path(tmp), dataset
    for entry in root.iterdir():
        if entry.name not in ("colours", "mlflow.db"):
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
    store = Path(urlsplit(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}").path)
    assert not store.exists() or is_blank_store(store), f"{store} has runs: give this test fresh=True"
    shutil.copy2(root / "mlflow.db", store)


_TEMPLATE: dict[str, Path] = {}


def _make_until_register(tmp, dataset, backbone):
    prepare(tmp / "prepared", **sections("prepare", input=dataset), progress=False)
    bottleneck(tmp / "prepared", tmp / "bn", **sections("bottleneck", handle=str(backbone), cache_dir=tmp / "cache", views=1), progress=False)
    train(tmp / "bn", tmp / "model", **sections("train", learning_rate=0.05, epochs=150, patience=30), progress=False)
    evaluate(tmp / "model", tmp / "bn", tmp / "eval", tmp / "ev.json", **sections("evaluate", bootstrap=20))
    calibrate(tmp / "eval", tmp / "model", tmp / "th.json", tmp / "ca.json", **sections("calibrate"), bottlenecks=tmp / "bn",
              progress=False, report=tmp / "calibration" / "details.json")


def _register_cli(tmp, name, env=None, check=False):
    return run_cli("register", "--model", str(tmp / "model"), "--thresholds", str(tmp / "th.json"), "--prepared",
                   str(tmp / "prepared"), "--out", str(tmp / "rg.json"), "--model-name", name, "--tflite", "false",
                   cwd=tmp, env=env, check=check)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["register:decided", "register:logged", "register:created",
                                   "register:challenger", "register:champion"])
def test_register_killed_at_any_point_converges_on_rerun(tmp_path, colour_dataset, fake_backbone, mlflow_store, point):
    from mlflow import MlflowClient

    _steps_until_register(tmp_path, colour_dataset, fake_backbone)
    killed = _register_cli(tmp_path, "faulty", env={"MLTAG_FAULT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    again = _register_cli(tmp_path, "faulty", check=True)
    client = MlflowClient()
    versions = client.search_model_versions("name='faulty'")
    assert len(versions) == 1, f"{point}: {len(versions)} versions after the rerun"
    v = versions[0]
    assert v.tags["mltag.gate"].startswith("promoted: ") and "mltag.content_hash" in v.tags
    assert str(client.get_model_version_by_alias("faulty", "champion").version) == str(v.version)
    assert str(client.get_model_version_by_alias("faulty", "challenger").version) == str(v.version)
    if point == "register:decided":  # and a third run of the same folder changes nothing (once is enough)
        _register_cli(tmp_path, "faulty", check=True)
        assert len(client.search_model_versions("name='faulty'")) == 1
    assert "version 1" in again.stdout


@pytest.mark.slow
def test_register_failing_at_scoring_leaves_the_registry_unchanged(tmp_path, colour_dataset, fake_backbone,
                                                                  mlflow_store):
    """A champion that cannot score the new label set: the stage fails and no version is left behind."""
    from mlflow import MlflowClient

    from mltag.errors import MltagError

    _steps_until_register(tmp_path, colour_dataset, fake_backbone)
    register(tmp_path / "model", tmp_path / "th.json", tmp_path / "prepared", tmp_path / "rg.json", **sections("register", model_name="labels", tflite=False))
    # Same model, but the prepared test split now claims a fourth label the champion does not score.
    prepared = tmp_path / "prepared"
    (prepared / "labels.txt").write_text("red\ngreen\nblue\npurple\n")
    for split in ("train", "val", "test"):
        f = prepared / f"{split}.lst"
        f.write_text("".join(f"{ln.rsplit(chr(9), 1)[0]}\t0\t{ln.rsplit(chr(9), 1)[1]}\n"
                             for ln in f.read_text().splitlines() if ln.strip()))
    (tmp_path / "model" / "extra.txt").write_text("changes the content hash\n")
    client = MlflowClient()
    before = [(v.version, dict(v.tags)) for v in client.search_model_versions("name='labels'")]
    with pytest.raises(MltagError):
        register(tmp_path / "model", tmp_path / "th.json", prepared, tmp_path / "rg2.json", **sections("register", model_name="labels", tflite=False))
    after = [(v.version, dict(v.tags)) for v in client.search_model_versions("name='labels'")]
    assert after == before
    assert str(client.get_model_version_by_alias("labels", "challenger").version) == "1"


def test_unreachable_mlflow_fails_within_seconds_naming_the_uri(tmp_path, colour_dataset, fake_backbone):
    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "cache", views=1), progress=False)
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    p = run_cli("train", "--bottlenecks", str(tmp_path / "bn"), "--out", str(tmp_path / "model"), cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": uri}, check=False)
    took = time.time() - t0
    assert p.returncode == 2 and uri in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert took < 15, f"took {took:.0f} s"
    assert not (tmp_path / "model").exists()


def _pack_entries(path: Path) -> tuple[list[str], np.ndarray]:
    """The keys and float16 vectors of one pack file."""
    from mltag.data.store import read_pack_table

    data = path.read_bytes()
    dim, table = read_pack_table(data)
    start = len(data) - 2 * dim * len(table)
    return [k for k, _ in table], np.frombuffer(data[start:], np.float16).reshape(len(table), dim)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "nan", "key_table"])
def test_damaged_cache_entries_are_recomputed_never_trusted(tmp_path, colour_dataset, fake_backbone, damage):
    from mltag.data.store import pack_bytes

    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    first = bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "cache", views=1), progress=False)
    # The victim: the last entry of the largest pack (so a cut at its values loses it alone).
    pack = max((tmp_path / "cache").rglob("*.pack"), key=lambda p: (p.stat().st_size, p.name))
    keys, vecs = _pack_entries(pack)
    assert len(keys) > 1
    victim, good = keys[-1], vecs[-1].copy()
    data = pack.read_bytes()
    lost = 1
    if damage == "truncated":
        pack.write_bytes(data[:-5])
    elif damage == "garbage":
        pack.write_bytes(data[:-2 * len(good)] + os.urandom(2 * len(good)))
    elif damage == "nan":  # NaN values under valid checksums: caught by the finiteness check
        pack.write_bytes(pack_bytes(keys, np.concatenate([vecs[:-1], np.full((1, len(good)), np.nan)])))
    else:  # a flipped bit in the key table: the whole pack is a miss (counted once), never other keys
        pack.write_bytes(data[:40] + bytes([data[40] ^ 4]) + data[41:])
        lost = len(keys)
    again = bottleneck(tmp_path / "prepared", tmp_path / "bn2", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "cache", views=1), progress=False)
    assert again["computed"] == lost and again["cached"] == first["computed"] - lost, again
    assert again["untrusted_entries"] == 1
    np.testing.assert_array_equal(FeatureCache(tmp_path / "cache", "any", 0).get(victim), good)
    for split in ("train", "val", "test"):
        a, b = np.load(tmp_path / "bn" / f"{split}.npz"), np.load(tmp_path / "bn2" / f"{split}.npz")
        np.testing.assert_array_equal(a["features"], b["features"])








def test_read_only_output_and_cache_are_clear_errors(tmp_path, colour_dataset, fake_backbone):
    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    ro = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permissions: a file where a folder must be fails the same way
        ro.write_text("not a folder\n")
    else:
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        p = run_cli("bottleneck", "--prepared", str(tmp_path / "prepared"), "--out", str(ro / "bn"), "--handle",
                    str(fake_backbone), "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path, check=False)
        assert p.returncode == 2 and str(ro) in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
        p = run_cli("bottleneck", "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "bn"), "--handle",
                    str(fake_backbone), "--cache-dir", str(ro / "cache"), cwd=tmp_path, check=False)
        assert p.returncode == 2 and str(ro) in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    finally:
        ro.chmod(stat.S_IRWXU)
    assert not (tmp_path / "bn").exists()


def test_a_bug_still_shows_its_traceback_and_exit_1(tmp_path):
    """Only user errors are one line: anything else is a bug, and hiding it would hide the cause."""
    code = ("import sys; from mltag import cli\n"
            "def boom(args): raise ZeroDivisionError('bug')\n"
            "cli._dispatch = boom\nsys.exit(cli.main(['metrics']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" in p.stderr and "ZeroDivisionError" in p.stderr


@pytest.mark.slow
def test_predict_names_the_bad_file_and_still_labels_the_others(tmp_path, colour_dataset, fake_backbone,
                                                               mlflow_store):
    _steps_until_register(tmp_path, colour_dataset, fake_backbone)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = colour_dataset / "images" / "0001.jpg"
    p = run_cli("predict", "--model", str(tmp_path / "model"), str(good), str(bad), str(tmp_path / "gone.jpg"),
                cwd=tmp_path, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stdout.splitlines()  # one row per image, in the order given; a bad one says why in its row
    assert lines[0].startswith(f"{good}: ") and "error" not in lines[0]
    assert lines[1].startswith(f"{bad}: error: corrupt or truncated image") and lines[2] == f"{tmp_path / 'gone.jpg'}: error: file not found"
    assert "2 of 3 images could not be read" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("predict", "--model", str(tmp_path / "model"), "--format", "csv", str(good), str(bad), cwd=tmp_path,
                check=False)
    import csv

    rows = list(csv.DictReader(p.stdout.splitlines()))
    assert p.returncode == 2 and [r["path"] for r in rows] == [str(good), str(bad)]
    assert rows[0]["error"] == "" and float(rows[0]["score_red"]) >= 0 and rows[1]["score_red"] == ""
    assert rows[1]["error"].startswith("corrupt or truncated image")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _bottleneck_cli(tmp, out, *extra, env=None, check=False, popen=False, handle=None):
    args = ["bottleneck", "--prepared", str(tmp / "prepared"), "--out", str(tmp / out), "--handle", str(handle),
            "--cache-dir", str(tmp / "cache"), "--batch-size", "8", "--views", "1",
            "--metrics", str(tmp / f"{out}.metrics.json"), *extra]
    if popen:
        e = dict(os.environ)
        e.update(env or {})
        return subprocess.Popen([sys.executable, "-m", "mltag.cli", *args], cwd=tmp, env=e,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return run_cli(*args, cwd=tmp, env=env, check=check)


def _stats(tmp, out) -> dict:
    import json

    return json.loads((tmp / f"{out}.metrics.json").read_text())


@pytest.mark.slow
def test_bottleneck_killed_mid_batch_converges_and_leftovers_are_cleaned(tmp_path, colour_dataset, fake_backbone):
    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    n = 48
    killed = _bottleneck_cli(tmp_path, "bn", env={"MLTAG_FAULT": "bottleneck:written"}, handle=fake_backbone)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "bn").exists()  # no half-written output
    written = FeatureCache(tmp_path / "cache", "any", 0).locations()
    assert 1 <= len(written) < n
    # leftovers a killed run could leave: a temp pack (full disk), a temp output folder, a swapped-out old output
    dead = _dead_pid()
    packs = tmp_path / "cache" / "packs"
    leftovers = [packs / f".{'0' * 24}.pack.{dead}.tmp", tmp_path / f".bn.{dead}.x1y2.tmp", tmp_path / f".bn.old-{dead}"]
    leftovers[0].write_bytes(b"")
    for d in leftovers[1:]:
        d.mkdir()
        (d / "train.npz").write_bytes(b"half")
    alive = tmp_path / f".bn.{os.getpid()}.live.tmp"  # a live process's temp folder is never touched
    alive.mkdir()
    past = time.time() - 3600
    for f in [*leftovers, alive]:
        os.utime(f, (past, past))
    _bottleneck_cli(tmp_path, "bn", check=True, handle=fake_backbone)
    assert _stats(tmp_path, "bn")["computed"] == n - len(written)
    assert [f for f in leftovers if f.exists()] == [] and alive.exists()
    clean = bottleneck(tmp_path / "prepared", tmp_path / "clean", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "fresh-cache", batch_size=8, views=1), progress=False)
    assert clean["computed"] == n
    for name in ("train.npz", "val.npz", "test.npz", "labels.txt"):
        assert (tmp_path / "bn" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    import json

    meta = [json.loads((tmp_path / d / "bottleneck.json").read_text()) for d in ("bn", "clean")]
    recorded = meta[0].pop("config")  # the CLI records what the vectors depend on, not how they were computed
    assert recorded["bottleneck"] == {"views": 1} and set(recorded["backbone"]) == {"handle", "image_size", "precision"}
    assert meta[1].pop("config") is None and meta[0] == meta[1]


def test_rerun_on_unchanged_data_leaves_the_output_byte_identical(tmp_path, colour_dataset, fake_backbone):
    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    outputs = []
    for i in range(2):
        s = bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "cache", views=2), progress=False, metrics=tmp_path / f"m{i}.json")
        assert s["computed"] == (0 if i else s["computed"]) and (tmp_path / f"m{i}.json").is_file()
        outputs.append({f.name: f.read_bytes() for f in sorted((tmp_path / "bn").iterdir())})
    assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_two_concurrent_bottleneck_runs_compute_each_vector_once(tmp_path, colour_dataset, fake_backbone):
    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    # The first run is slowed to 1 s per batch, so the second arrives while it computes.
    first = _bottleneck_cli(tmp_path, "a", env={"MLTAG_FAULT": "bottleneck:batch=sleep:1"}, popen=True,
                            handle=fake_backbone)
    deadline = time.time() + 120
    while not list((tmp_path / "cache").rglob("*.pack")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    second = _bottleneck_cli(tmp_path, "b", check=True, handle=fake_backbone)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    a, b = _stats(tmp_path, "a"), _stats(tmp_path, "b")
    assert a["computed"] + b["computed"] == 48 and a["computed"] == 48, (a, b)
    assert "waiting for another mltag run" in second.stderr
    for split in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{split}.npz").read_bytes() == (tmp_path / "b" / f"{split}.npz").read_bytes()




def test_bottleneck_reads_only_the_images_it_computes_and_checks_their_recorded_hash(tmp_path, colour_dataset,
                                                                                      fake_backbone):
    import shutil

    from PIL import Image

    from mltag.data.formats import load_hashes
    from mltag.errors import MltagError

    data = tmp_path / "data"
    shutil.copytree(colour_dataset, data)
    prepare(tmp_path / "prepared", **sections("prepare", input=data), progress=False)
    hashes = load_hashes(tmp_path / "prepared")
    assert len(hashes) == 48 and all(len(h) == 64 for h in hashes.values())
    run = dict(progress=False)
    assert bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "cache", views=1), **run)["computed"] == 48
    # Every vector is cached: the images are not read at all, so they may be gone.
    (data / "images").rename(data / "away")
    s = bottleneck(tmp_path / "prepared", tmp_path / "bn2", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "cache", views=1), **run)
    assert s["computed"] == 0 and s["cached"] == 48
    (data / "away").rename(data / "images")
    # An image edited after prepare is caught when it is read, never cached under the old hash.
    victim = sorted(hashes)[0]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(data / victim)
    with pytest.raises(MltagError, match="changed since prepare hashed it; run prepare again"):
        bottleneck(tmp_path / "prepared", tmp_path / "bn3", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "cache2", views=1), **run)


def test_vector_store_at_an_fsspec_uri_is_shared_and_checked_like_a_folder(tmp_path, colour_dataset, fake_backbone):
    import fsspec

    store = f"memory://mltag-store-{os.getpid()}"
    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    cfg = sections("bottleneck", handle=str(fake_backbone), cache_dir=store, views=1)
    first = bottleneck(tmp_path / "prepared", tmp_path / "bn1", **cfg, progress=False)
    assert first["computed"] == 48
    fs = fsspec.filesystem("memory")
    assert len(FeatureCache(store, "any", 0).locations()) == 48
    # A damaged entry is recomputed, never trusted; everything else comes from the store.
    pack = max((p for p in fs.find(store.removeprefix("memory://")) if p.endswith(".pack")), key=fs.size)
    data = fs.cat_file(pack)
    fs.pipe_file(pack, data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    second = bottleneck(tmp_path / "prepared", tmp_path / "bn2", **cfg, progress=False)
    assert (second["computed"], second["cached"], second["untrusted_entries"]) == (1, 47, 1)
    for split in ("train", "val", "test"):
        a, b = (np.load(tmp_path / d / f"{split}.npz")["features"] for d in ("bn1", "bn2"))
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_a_model_from_another_tracking_store_logs_into_one_stand_in_run(tmp_path, colour_dataset, fake_backbone,
                                                                       monkeypatch):
    from mlflow import MlflowClient

    from mltag.errors import MltagError
    from mltag.tracking import runs as tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'first.db'}")
    _steps_until_register(tmp_path, colour_dataset, fake_backbone, fresh=True)
    trained_in = tracking.run_id_of(tmp_path / "model")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    reports = [tmp_path / "eval" / "details.json", tmp_path / "calibration" / "details.json"]

    def register_in_other(**kw):
        register(tmp_path / "model", tmp_path / "th.json", tmp_path / "prepared", tmp_path / "rg.json",
                 **sections("register", model_name="stand-in", tflite=False), tracking_uri=other, reports=reports, **kw)

    # An explicit run id (what Kubeflow passes) that this store lacks: a clear error before any work.
    with pytest.raises(MltagError, match=f"MLflow run {trained_in} does not exist in the tracking store {other}"):
        register_in_other(run_id=trained_in)
    assert not (tmp_path / "rg.json").exists()
    # From the model folder's own run.json (dvc pull, dvc exp run --temp): one stand-in run, found again; the
    # figures evaluate and calibrate kept for the run go into it.
    register_in_other()
    register_in_other()
    tracking.setup(other)
    runs = MlflowClient().search_runs(["0", *[e.experiment_id for e in MlflowClient().search_experiments()]])
    stand_ins = {r.info.run_id: r for r in runs if r.data.tags.get(tracking.MODEL_RUN_TAG) == trained_in}
    assert len(stand_ins) == 1, runs
    (run,) = stand_ins.values()
    assert "test_map" in run.data.metrics and "calibrated_test_micro_f1" in run.data.metrics
    assert run.data.tags["mltag.trained_in"] == f"sqlite:///{tmp_path / 'first.db'}"


# --------------------------------------------------------------------------- the round of #23: tampered models,
# secrets in tracking URIs, options smuggled into git, NaN, damaged hand-off files, half-states, small ones


def _tamper_labels(model_dir: Path, new_labels: list[str]) -> None:
    import json

    meta = json.loads((model_dir / "model.json").read_text())
    meta["labels"] = new_labels
    (model_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    (model_dir / "labels.txt").write_text("".join(f"{x}\n" for x in new_labels))


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["cut", "reversed"])
def test_a_hand_edited_label_list_is_never_registered_or_served(tmp_path, colour_dataset, fake_backbone, mlflow_store,
                                                                 edit):
    """Case 1: model.json's labels cut to the first two of three, or reversed, in a copy of the model folder."""
    import shutil

    from mlflow import MlflowClient

    from mltag.data.integrity import write_integrity
    from mltag.errors import MltagError
    from mltag.inference.model import InferenceModel

    _steps_until_register(tmp_path, colour_dataset, fake_backbone)
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "model", edited)
    labels = ["red", "green", "blue"]
    _tamper_labels(edited, labels[:2] if edit == "cut" else labels[::-1])
    p = run_cli("register", "--model", str(edited), "--thresholds", str(tmp_path / "th.json"), "--prepared",
                str(tmp_path / "prepared"), "--out", str(tmp_path / "rg.json"), "--model-name", "tampered", "--tflite",
                "false", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"{edited / 'labels.txt'}" in p.stderr or f"{edited / 'model.json'}" in p.stderr, p.stderr
    assert "changed after train recorded the model's content hash" in p.stderr
    assert MlflowClient().search_model_versions("name='tampered'") == []
    assert not (tmp_path / "rg.json").exists()
    image = colour_dataset / "images" / "0001.jpg"
    for cmd in (["predict", "--model", str(edited), str(image)],
                ["evaluate", "--model", str(edited), "--bottlenecks", str(tmp_path / "bn"), "--out",
                 str(tmp_path / "ev2"), "--metrics", str(tmp_path / "ev2.json")]):
        p = run_cli(*cmd, cwd=tmp_path, check=False)
        assert p.returncode == 2 and "content hash" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert str(image) + ":" not in p.stdout
    # Someone who also rewrites the recorded hash: the head keeps the names it was trained with, so predict and
    # serving still refuse a cut or reordered list, and register still refuses the folder, as train's run holds
    # the hash it recorded.
    write_integrity(edited)
    with pytest.raises(MltagError, match="names other labels \\(red, green\\) than red, green, blue" if edit == "cut"
                       else "lists the same labels in another order"):
        InferenceModel(edited)
    p = run_cli("register", "--model", str(edited), "--thresholds", str(tmp_path / "th.json"), "--prepared",
                str(tmp_path / "prepared"), "--out", str(tmp_path / "rg.json"), "--model-name", "tampered", "--tflite",
                "false", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert ("differs from the one train recorded" in p.stderr if edit == "reversed"
            else "thresholds name label(s) the model does not score: blue" in p.stderr), p.stderr
    assert MlflowClient().search_model_versions("name='tampered'") == []




@pytest.mark.slow
def test_a_data_repo_still_resolves_through_git_ls_remote(tmp_path):
    from mltag.data.fetch import resolve_version

    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True, env=env)
    (repo / "f").write_text("x")
    subprocess.run(["git", "-C", str(repo), "add", "f"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "x"], check=True, env=env)
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert resolve_version("d", str(repo), "main") == f"{repo}@{sha}"
    assert resolve_version("d", str(repo), "") == f"{repo}@{sha}"


def _rewrite_npz(f: Path, **changes) -> None:
    with np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez(f, **arrays)


@pytest.mark.slow
def test_train_refuses_non_finite_vectors_and_never_exits_0_with_a_nan_loss(tmp_path, colour_dataset, fake_backbone,
                                                                            mlflow_store):
    """Case 4: a NaN in the split vectors (with and without a validation split), and a diverging fit."""
    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "cache", views=1), progress=False)
    bn = tmp_path / "bn"
    clean = {s: (bn / f"{s}.npz").read_bytes() for s in ("train", "val")}
    with np.load(bn / "train.npz") as z:
        x = z["features"].copy()
    x[3, 1], x[5, 0] = np.nan, np.inf
    _rewrite_npz(bn / "train.npz", features=x)

    def train_cli(*extra):
        return run_cli("train", "--bottlenecks", str(bn), "--out", str(tmp_path / "model"), *extra, cwd=tmp_path,
                       check=False)

    p = train_cli()
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"{bn / 'train.npz'}: 2 non-finite value(s)" in p.stderr, p.stderr
    with np.load(bn / "val.npz") as z:
        empty = {k: z[k][:0] for k in z.files}
    _rewrite_npz(bn / "val.npz", **empty)
    p = train_cli()
    assert p.returncode == 2 and "2 non-finite value(s)" in p.stderr and "Traceback" not in p.stderr, p.stderr
    (bn / "train.npz").write_bytes(clean["train"])
    p = train_cli("--learning-rate", "1e38", "--epochs", "20")  # no validation split: the documented fallback
    assert p.returncode == 2 and "training diverged" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    (bn / "val.npz").write_bytes(clean["val"])
    p = train_cli("--learning-rate", "1e38", "--epochs", "20")
    assert p.returncode == 2 and "training diverged" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "model").exists()
    p = train_cli("--learning-rate", "0.05")  # the empty-val fallback itself trains (on the train loss)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["prepared/dataset.json", "bn/bottleneck.json", "model/model.json", "th.json",
                                    "bn/train.npz", "bn/test.npz", "eval/scores.npz", "model/run.json",
                                    "model/integrity.json"])
def test_each_damaged_hand_off_file_is_a_clear_error_naming_it(tmp_path, colour_dataset, fake_backbone, mlflow_store,
                                                               victim):
    """Case 5: each hand-off file truncated in turn; every step that reads it says which file, exit 2."""
    _steps_until_register(tmp_path, colour_dataset, fake_backbone)
    f = tmp_path / victim
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    t = str(tmp_path)
    readers = {
        "prepared/dataset.json": [["register", "--model", f"{t}/model", "--thresholds", f"{t}/th.json", "--prepared",
                                   f"{t}/prepared", "--out", f"{t}/rg.json", "--tflite", "false"]],
        "bn/bottleneck.json": [["train", "--bottlenecks", f"{t}/bn", "--out", f"{t}/m2"]],
        "model/model.json": [["evaluate", "--model", f"{t}/model", "--bottlenecks", f"{t}/bn", "--out", f"{t}/e2",
                              "--metrics", f"{t}/e2.json"],
                             ["predict", "--model", f"{t}/model", str(colour_dataset / "images" / "0001.jpg")]],
        "th.json": [["register", "--model", f"{t}/model", "--thresholds", f"{t}/th.json", "--prepared",
                     f"{t}/prepared", "--out", f"{t}/rg.json", "--tflite", "false"]],
        "bn/train.npz": [["train", "--bottlenecks", f"{t}/bn", "--out", f"{t}/m2"]],
        "bn/test.npz": [["evaluate", "--model", f"{t}/model", "--bottlenecks", f"{t}/bn", "--out", f"{t}/e2",
                         "--metrics", f"{t}/e2.json"]],
        "eval/scores.npz": [["calibrate", "--evaluation", f"{t}/eval", "--model", f"{t}/model", "--bottlenecks",
                             f"{t}/bn", "--out", f"{t}/th2.json", "--metrics", f"{t}/ca2.json"]],
        "model/run.json": [["register", "--model", f"{t}/model", "--thresholds", f"{t}/th.json", "--prepared",
                            f"{t}/prepared", "--out", f"{t}/rg.json", "--tflite", "false"]],
        "model/integrity.json": [["predict", "--model", f"{t}/model", str(colour_dataset / "images" / "0001.jpg")]],
    }
    for cmd in readers[victim]:
        p = run_cli(*cmd, cwd=tmp_path, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (cmd, p.stderr[-2000:])
        assert f"{f}" in p.stderr and "damaged" in p.stderr, (cmd, p.stderr)
    assert not (tmp_path / "rg.json").exists() and not (tmp_path / "th2.json").exists()


def test_every_subcommand_has_a_working_help():
    """Case 5: `mltag evaluate --help` crashed on the '%' of '95%'."""
    from mltag.cli.parser import build_parser

    def commands(parser, prefix=()):
        import argparse

        yield prefix
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, (*prefix, name))

    import contextlib
    import io

    parser = build_parser()
    found = list(commands(parser))
    assert ("evaluate",) in found and ("pipeline", "run") in found and ("backbone", "build") in found
    for cmd in found:  # each help as the parser formats it in `mltag`, here (a process each took 0.3 s)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
            parser.parse_args([*cmd, "--help"])
        assert done.value.code == 0 and "usage: mltag" in out.getvalue() and not err.getvalue(), (cmd, err.getvalue())
    p = run_cli("evaluate", "--help")  # and through the console script's module, the command that crashed
    assert p.returncode == 0 and "95%" in p.stdout and not p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_a_full_disk_names_the_path_and_keeps_the_previous_output(tmp_path, colour_dataset, fake_backbone,
                                                                   mlflow_store):
    """Case 5: ENOSPC on write carries no file name; the error names the output (real process, fault hook)."""
    _steps_until_register(tmp_path, colour_dataset, fake_backbone)
    before = (tmp_path / "ev.json").read_bytes()
    p = run_cli("evaluate", "--model", str(tmp_path / "model"), "--bottlenecks", str(tmp_path / "bn"), "--out",
                str(tmp_path / "eval"), "--metrics", str(tmp_path / "ev.json"), "--bootstrap", "20", cwd=tmp_path,
                env={"MLTAG_FAULT": "write:ev.json=enospc"}, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"{tmp_path / 'ev.json'}: cannot write: No space left on device" in p.stderr, p.stderr
    assert (tmp_path / "ev.json").read_bytes() == before
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".ev.json.")]


@pytest.mark.slow
def test_register_checks_its_output_before_the_registry_and_cleans_killed_scratch(tmp_path, colour_dataset,
                                                                                  fake_backbone, mlflow_store):
    """Case 6: an unwritable --out changes nothing in the registry; a killed register's scratch is removed."""
    from mlflow import MlflowClient

    _steps_until_register(tmp_path, colour_dataset, fake_backbone)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where register's output folder must be\n")
    p = run_cli("register", "--model", str(tmp_path / "model"), "--thresholds", str(tmp_path / "th.json"),
                "--prepared", str(tmp_path / "prepared"), "--out", str(blocker / "rg.json"), "--model-name", "half",
                "--tflite", "false", cwd=tmp_path, check=False)
    assert p.returncode == 2 and str(blocker) in p.stderr and "nothing was registered" in p.stderr, p.stderr[-2000:]
    assert MlflowClient().search_model_versions("name='half'") == []
    killed = _register_cli(tmp_path, "half", env={"MLTAG_FAULT": "register:decided"})
    assert killed.returncode == -signal.SIGKILL
    left = [x for x in tmp_path.iterdir() if x.name.startswith(".mltag-register.")]
    assert len(left) == 1 and left[0].is_dir() and (left[0] / "model" / "model.json").is_file()
    _register_cli(tmp_path, "half", check=True)
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".mltag-register.")]
    tmp_root = Path(os.environ.get("TMPDIR", "/tmp"))
    assert not [x for x in tmp_root.glob("mltag-register-*") if x.stat().st_mtime > time.time() - 600]


@pytest.mark.slow
def test_a_train_killed_with_kill_9_has_its_run_ended_by_the_next_train(tmp_path, colour_dataset, fake_backbone,
                                                                         mlflow_store):
    """Case 6: the run a killed train left RUNNING is ended as KILLED, with a note, by the next train."""
    from mlflow import MlflowClient

    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "cache", views=1), progress=False)
    args = ("train", "--bottlenecks", str(tmp_path / "bn"), "--out", str(tmp_path / "model"), "--learning-rate", "0.05")
    killed = run_cli(*args, cwd=tmp_path, env={"MLTAG_FAULT": "train:fitting"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    client = MlflowClient()
    exp = client.get_experiment_by_name("mltag")
    (stale,) = client.search_runs([exp.experiment_id])
    assert stale.info.status == "RUNNING"
    other = run_cli(*args[:3], "--out", str(tmp_path / "other"), "--learning-rate", "0.05", cwd=tmp_path)
    assert client.get_run(stale.info.run_id).info.status == "RUNNING", "another model's train must not end it"
    assert "left RUNNING" not in other.stderr
    again = run_cli(*args, cwd=tmp_path)
    assert f"MLflow run {stale.info.run_id} was left RUNNING" in again.stderr
    ended = client.get_run(stale.info.run_id)
    assert ended.info.status == "KILLED" and "was gone" in ended.data.tags["mltag.note"]
    statuses = sorted(r.info.status for r in client.search_runs([exp.experiment_id]))
    assert statuses == ["FINISHED", "FINISHED", "KILLED"]


def test_verbose_after_the_subcommand_and_a_dotdot_path_inside_the_root(tmp_path, colour_dataset):
    """Case 7: `-v` is accepted after the subcommand; images/../images/x.jpg stays inside the root."""
    p = run_cli("metrics", "-v", "--evaluate", str(tmp_path / "missing.json"), cwd=tmp_path, check=False)
    assert p.returncode == 2 and "Traceback" in p.stderr and "no metrics yet" in p.stderr, p.stderr[-2000:]
    p = run_cli("metrics", "--evaluate", str(tmp_path / "missing.json"), "-q", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lst = colour_dataset / "all.lst"
    lines = lst.read_text().splitlines()
    lines[0] = lines[0].replace("\timages/", "\timages/../images/./")
    lst.write_text("\n".join(lines) + "\n")
    r = prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    assert r["images_used"] == 48
    listed = "".join((tmp_path / "prepared" / f"{s}.lst").read_text() for s in ("train", "val", "test"))
    assert "\timages/0000.jpg\n" in listed and ".." not in listed
    lines[1] = lines[1].replace("\timages/", "\timages/../../")
    lst.write_text("\n".join(lines) + "\n")
    from mltag.errors import MltagError

    with pytest.raises(MltagError, match=r"all.lst:2: image path 'images/../../0001.jpg' leads outside the image root"):
        prepare(tmp_path / "p2", **sections("prepare", input=colour_dataset), progress=False)


def test_a_step_that_fails_at_once_says_why_and_starts_no_child_process(tmp_path):
    """A step runs in one plain process: when it fails at once (here: no such model), the error is the
    step's own, in one line, and nothing it started outlives it."""
    p = run_cli("evaluate", "--model", str(tmp_path / "missing"), "--bottlenecks", str(tmp_path / "bn"),
                "--out", str(tmp_path / "out"), cwd=tmp_path, check=False)
    assert p.returncode == 2 and "missing" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    left = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd") == str(tmp_path):
                left.append(int(proc.name))
        except OSError:
            continue
    assert not left



def test_calibrate_refuses_an_evaluation_of_another_model(tmp_path, colour_dataset, fake_backbone, mlflow_store):
    """#51: calibrate took the evaluation of another model (its thresholds fitted to scores this model never gave);
    evaluate's report names the model by its content hash, and calibrate compares, before it writes anything."""
    from mltag.errors import MltagError

    _steps_until_register(tmp_path, colour_dataset, fake_backbone)
    train(tmp_path / "bn", tmp_path / "model2", **sections("train", learning_rate=0.05, epochs=20, seed=7),
          progress=False)
    with pytest.raises(MltagError, match=r"details.json: this evaluation is of another model"):
        calibrate(tmp_path / "eval", tmp_path / "model2", tmp_path / "th2.json", tmp_path / "ca2.json",
                  **sections("calibrate"), bottlenecks=tmp_path / "bn", progress=False)
    assert not (tmp_path / "th2.json").exists() and not (tmp_path / "ca2.json").exists()
    calibrate(tmp_path / "eval", tmp_path / "model", tmp_path / "th2.json", tmp_path / "ca2.json",
              **sections("calibrate"), bottlenecks=tmp_path / "bn", progress=False)  # its own model: fine
