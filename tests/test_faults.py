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
from test_mlflow_server import free_port, start_server, stop

from conftest import run_cli
from mltag.bottleneck import FeatureCache, bottleneck
from mltag.calibrate import calibrate
from mltag.evaluate import evaluate
from mltag.prepare import prepare
from mltag.train import train


def _steps_until_register(tmp, dataset, backbone):
    prepare(dataset, tmp / "prepared", progress=False)
    bottleneck(tmp / "prepared", tmp / "bn", handle=str(backbone), cache_dir=tmp / "cache", progress=False)
    train(tmp / "bn", tmp / "model", learning_rate=0.05, epochs=150, patience=30, progress=False)
    evaluate(tmp / "model", tmp / "bn", tmp / "eval", tmp / "ev.json", bootstrap=20)
    calibrate(tmp / "eval", tmp / "model", tmp / "th.json", tmp / "ca.json", bottlenecks=tmp / "bn", progress=False)


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
    # and a third run of the same folder changes nothing
    _register_cli(tmp_path, "faulty", check=True)
    assert len(client.search_model_versions("name='faulty'")) == 1
    assert "version 1" in again.stdout


def test_register_failing_at_scoring_leaves_the_registry_unchanged(tmp_path, colour_dataset, fake_backbone,
                                                                  mlflow_store):
    """A champion that cannot score the new label set: the stage fails and no version is left behind."""
    from mlflow import MlflowClient

    from mltag.common import MltagError
    from mltag.register import register

    _steps_until_register(tmp_path, colour_dataset, fake_backbone)
    register(tmp_path / "model", tmp_path / "th.json", tmp_path / "prepared", tmp_path / "rg.json",
             model_name="labels", tflite=False)
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
        register(tmp_path / "model", tmp_path / "th.json", prepared, tmp_path / "rg2.json", model_name="labels",
                 tflite=False)
    after = [(v.version, dict(v.tags)) for v in client.search_model_versions("name='labels'")]
    assert after == before
    assert str(client.get_model_version_by_alias("labels", "challenger").version) == "1"


def test_unreachable_mlflow_fails_within_seconds_naming_the_uri(tmp_path, colour_dataset, fake_backbone):
    prepare(colour_dataset, tmp_path / "prepared", progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", handle=str(fake_backbone), cache_dir=tmp_path / "cache",
               progress=False)
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    p = run_cli("train", "--bottlenecks", str(tmp_path / "bn"), "--out", str(tmp_path / "model"), cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": uri}, check=False)
    took = time.time() - t0
    assert p.returncode == 2 and uri in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert took < 15, f"took {took:.0f} s"
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_server_stopped_between_train_and_register_then_restarted(tmp_path, colour_dataset, fake_backbone):
    """register against a dead server: clear error in seconds, model folder kept; after a restart, register alone."""
    port = free_port()
    server = start_server(tmp_path / "srv", port)
    uri = f"http://127.0.0.1:{port}"
    env = {"MLFLOW_TRACKING_URI": uri}
    try:
        run_cli("prepare", "--input", str(colour_dataset), "--out", str(tmp_path / "prepared"), cwd=tmp_path, env=env)
        run_cli("bottleneck", "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "bn"), "--handle",
                str(fake_backbone), "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path, env=env)
        run_cli("train", "--bottlenecks", str(tmp_path / "bn"), "--out", str(tmp_path / "model"), "--learning-rate",
                "0.05", cwd=tmp_path, env=env)
        run_cli("evaluate", "--model", str(tmp_path / "model"), "--bottlenecks", str(tmp_path / "bn"), "--prepared",
                str(tmp_path / "prepared"), "--out", str(tmp_path / "eval"), "--metrics", str(tmp_path / "ev.json"),
                "--bootstrap", "20", cwd=tmp_path, env=env)
        run_cli("calibrate", "--evaluation", str(tmp_path / "eval"), "--model", str(tmp_path / "model"),
                "--bottlenecks", str(tmp_path / "bn"), "--out", str(tmp_path / "th.json"), "--metrics",
                str(tmp_path / "ca.json"), cwd=tmp_path, env=env)
    finally:
        stop(server)
    t0 = time.time()
    p = _register_cli(tmp_path, "restart", env=env)
    assert p.returncode == 2 and uri in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert time.time() - t0 < 15
    assert (tmp_path / "model" / "model.json").is_file()
    server = start_server(tmp_path / "srv", port)
    try:
        done = _register_cli(tmp_path, "restart", env=env, check=True)
        assert "version 1 promoted to champion" in done.stdout
    finally:
        stop(server)


def _pack_entries(path: Path) -> tuple[list[str], np.ndarray]:
    """The keys and float16 vectors of one pack file."""
    from mltag.bottleneck import read_pack_table

    data = path.read_bytes()
    dim, table = read_pack_table(data)
    start = len(data) - 2 * dim * len(table)
    return [k for k, _ in table], np.frombuffer(data[start:], np.float16).reshape(len(table), dim)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "nan", "key_table"])
def test_damaged_cache_entries_are_recomputed_never_trusted(tmp_path, colour_dataset, fake_backbone, damage):
    from mltag.bottleneck import pack_bytes

    prepare(colour_dataset, tmp_path / "prepared", progress=False)
    first = bottleneck(tmp_path / "prepared", tmp_path / "bn", handle=str(fake_backbone),
                       cache_dir=tmp_path / "cache", progress=False)
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
    again = bottleneck(tmp_path / "prepared", tmp_path / "bn2", handle=str(fake_backbone),
                       cache_dir=tmp_path / "cache", progress=False)
    assert again["computed"] == lost and again["cached"] == first["computed"] - lost, again
    assert again["untrusted_entries"] == 1
    np.testing.assert_array_equal(FeatureCache(tmp_path / "cache", "any", 0).get(victim), good)
    for split in ("train", "val", "test"):
        a, b = np.load(tmp_path / "bn" / f"{split}.npz"), np.load(tmp_path / "bn2" / f"{split}.npz")
        np.testing.assert_array_equal(a["features"], b["features"])


def test_garbage_with_a_valid_header_is_caught_by_the_checksum(tmp_path):
    """Bit rot inside the data of a finite float16 vector still loads as numbers; the stored hash catches it."""
    cache = FeatureCache(tmp_path / "c", "backbone-x", 32)
    vec = np.linspace(-1, 1, 16).astype(np.float16)
    key = cache.key("a" * 64, 0)
    cache.put(key, vec)
    f = next((tmp_path / "c").rglob("*.pack"))
    data = bytearray(f.read_bytes())
    data[-4] ^= 0x01  # one flipped bit in the last values: still finite, still the right shape
    f.write_bytes(bytes(data))
    assert cache.get(key) is None and cache.rejected == 1


def test_eps_renamed_jpg_is_refused_everywhere(tmp_path):
    from mltag.images import BadImage, load_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
    f = tmp_path / "evil.jpg"
    f.write_bytes(eps)
    with pytest.raises(BadImage, match="supported format"):
        load_image(f, 32)
    with pytest.raises(BadImage, match="supported format"):
        load_image(eps, 32)  # serving decodes bytes through the same function


def test_bom_and_non_utf8_label_files(tmp_path, colour_dataset):
    from mltag.common import MltagError, read_labels

    bom = tmp_path / "labels.txt"
    bom.write_bytes("\ufeffdesert\nsea\n".encode("utf-8"))
    assert read_labels(bom) == ["desert", "sea"]
    csv_dir = tmp_path / "csvdata"
    (csv_dir / "images").mkdir(parents=True)
    rows = ["\ufeffpath,labels"]
    for i, img in enumerate(sorted((colour_dataset / "images").iterdir())[:20]):
        (csv_dir / "images" / img.name).write_bytes(img.read_bytes())
        rows.append(f"images/{img.name},{'red' if i % 2 else 'blue'}")
    (csv_dir / "data.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    r = prepare(csv_dir, tmp_path / "prep", progress=False)
    assert r["format"] == "csv" and r["images_used"] == 20
    latin = tmp_path / "latin" / "labels.txt"
    latin.parent.mkdir()
    latin.write_bytes(b"desert\nfor\xeat\n")
    with pytest.raises(MltagError, match=r"labels.txt:2: not UTF-8"):
        read_labels(latin)


def test_read_only_output_and_cache_are_clear_errors(tmp_path, colour_dataset, fake_backbone):
    prepare(colour_dataset, tmp_path / "prepared", progress=False)
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


def test_predict_names_the_bad_file_and_still_labels_the_others(tmp_path, colour_dataset, fake_backbone,
                                                               mlflow_store):
    _steps_until_register(tmp_path, colour_dataset, fake_backbone)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = colour_dataset / "images" / "0001.jpg"
    p = run_cli("predict", "--model", str(tmp_path / "model"), str(good), str(bad), str(tmp_path / "gone.jpg"),
                cwd=tmp_path, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"{good}:" in p.stdout and str(bad) not in p.stdout
    assert f"{bad}:" in p.stderr and f"{tmp_path / 'gone.jpg'}: file not found" in p.stderr
    assert "Traceback" not in p.stderr


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
    prepare(colour_dataset, tmp_path / "prepared", progress=False)
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
    clean = bottleneck(tmp_path / "prepared", tmp_path / "clean", handle=str(fake_backbone),
                       cache_dir=tmp_path / "fresh-cache", batch_size=8, progress=False)
    assert clean["computed"] == n
    for name in ("train.npz", "val.npz", "test.npz", "labels.txt"):
        assert (tmp_path / "bn" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    import json

    meta = [json.loads((tmp_path / d / "bottleneck.json").read_text()) for d in ("bn", "clean")]
    assert meta[0].pop("config")["bottleneck"]["batch_size"] == 8 and meta[1].pop("config") is None  # CLI vs call
    assert meta[0] == meta[1]


def test_rerun_on_unchanged_data_leaves_the_output_byte_identical(tmp_path, colour_dataset, fake_backbone):
    prepare(colour_dataset, tmp_path / "prepared", progress=False)
    outputs = []
    for i in range(2):
        s = bottleneck(tmp_path / "prepared", tmp_path / "bn", handle=str(fake_backbone), cache_dir=tmp_path / "cache",
                       progress=False, views=2, metrics=tmp_path / f"m{i}.json")
        assert s["computed"] == (0 if i else s["computed"]) and (tmp_path / f"m{i}.json").is_file()
        outputs.append({f.name: f.read_bytes() for f in sorted((tmp_path / "bn").iterdir())})
    assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_two_concurrent_bottleneck_runs_compute_each_vector_once(tmp_path, colour_dataset, fake_backbone):
    prepare(colour_dataset, tmp_path / "prepared", progress=False)
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


def test_symlinks_out_of_the_image_root_are_refused_unless_allowed(tmp_path, colour_dataset):
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    images = sorted((colour_dataset / "images").iterdir())
    secret = outside / "secret.jpg"
    secret.write_bytes(images[0].read_bytes())
    images[0].unlink()
    images[0].symlink_to(secret)  # a file link leaving the root
    (outside / "dir" / "more.jpg").write_bytes(images[1].read_bytes())
    (colour_dataset / "linked").symlink_to(outside / "dir")  # a folder link leaving the root
    (colour_dataset / "images" / "alias.jpg").symlink_to(images[2])  # a link that stays inside is fine
    lst = colour_dataset / "all.lst"
    flags = lst.read_text().splitlines()[1].split("\t")[1:-1]
    lst.write_text(lst.read_text() + "".join(f"{i}\t" + "\t".join(flags) + f"\t{p}\n"
                                             for i, p in ((900, "linked/more.jpg"), (901, "images/alias.jpg"))))
    r = prepare(colour_dataset, tmp_path / "p1", progress=False)
    reasons = {x["path"]: x["reason"] for x in r["rejected"]}
    assert sorted(reasons) == [f"images/{images[0].name}", "linked/more.jpg"], reasons
    assert all("outside the image root" in why and "follow_symlinks" in why for why in reasons.values())
    kept = "".join((tmp_path / "p1" / f"{s}.lst").read_text() for s in ("train", "val", "test"))
    assert "images/alias.jpg" in kept and "linked/" not in kept and images[0].name not in kept
    r = prepare(colour_dataset, tmp_path / "p2", progress=False, follow_symlinks=True)
    assert r["rejected"] == [] and r["images_used"] == 50


def test_bottleneck_reads_only_the_images_it_computes_and_checks_their_recorded_hash(tmp_path, colour_dataset,
                                                                                      fake_backbone):
    import shutil

    from PIL import Image

    from mltag.common import MltagError
    from mltag.formats import load_hashes

    data = tmp_path / "data"
    shutil.copytree(colour_dataset, data)
    prepare(data, tmp_path / "prepared", progress=False)
    hashes = load_hashes(tmp_path / "prepared")
    assert len(hashes) == 48 and all(len(h) == 64 for h in hashes.values())
    run = dict(handle=str(fake_backbone), progress=False)
    assert bottleneck(tmp_path / "prepared", tmp_path / "bn", cache_dir=tmp_path / "cache", **run)["computed"] == 48
    # Every vector is cached: the images are not read at all, so they may be gone.
    (data / "images").rename(data / "away")
    s = bottleneck(tmp_path / "prepared", tmp_path / "bn2", cache_dir=tmp_path / "cache", **run)
    assert s["computed"] == 0 and s["cached"] == 48
    (data / "away").rename(data / "images")
    # An image edited after prepare is caught when it is read, never cached under the old hash.
    victim = sorted(hashes)[0]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(data / victim)
    with pytest.raises(MltagError, match="changed since prepare hashed it; run prepare again"):
        bottleneck(tmp_path / "prepared", tmp_path / "bn3", cache_dir=tmp_path / "cache2", **run)


def test_vector_store_at_an_fsspec_uri_is_shared_and_checked_like_a_folder(tmp_path, colour_dataset, fake_backbone):
    import fsspec

    store = f"memory://mltag-store-{os.getpid()}"
    prepare(colour_dataset, tmp_path / "prepared", progress=False)
    run = dict(handle=str(fake_backbone), cache_dir=store, progress=False)
    first = bottleneck(tmp_path / "prepared", tmp_path / "bn1", **run)
    assert first["computed"] == 48
    fs = fsspec.filesystem("memory")
    assert len(FeatureCache(store, "any", 0).locations()) == 48
    # A damaged entry is recomputed, never trusted; everything else comes from the store.
    pack = max((p for p in fs.find(store.removeprefix("memory://")) if p.endswith(".pack")), key=fs.size)
    data = fs.cat_file(pack)
    fs.pipe_file(pack, data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    second = bottleneck(tmp_path / "prepared", tmp_path / "bn2", **run)
    assert (second["computed"], second["cached"], second["untrusted_entries"]) == (1, 47, 1)
    for split in ("train", "val", "test"):
        a, b = (np.load(tmp_path / d / f"{split}.npz")["features"] for d in ("bn1", "bn2"))
        assert np.array_equal(a, b)


def test_a_model_from_another_tracking_store_logs_into_one_stand_in_run(tmp_path, colour_dataset, fake_backbone,
                                                                       monkeypatch):
    from mlflow import MlflowClient

    from mltag import tracking
    from mltag.common import MltagError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'first.db'}")
    _steps_until_register(tmp_path, colour_dataset, fake_backbone)
    trained_in = tracking.run_id_of(tmp_path / "model")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    # An explicit run id (what Kubeflow passes) that this store lacks: a clear error before any work.
    with pytest.raises(MltagError, match=f"MLflow run {trained_in} does not exist in the tracking store {other}"):
        evaluate(tmp_path / "model", tmp_path / "bn", tmp_path / "eval2", tmp_path / "ev2.json", bootstrap=5,
                 tracking_uri=other, run_id=trained_in)
    assert not (tmp_path / "eval2").exists()
    # From the model folder's own run.json (dvc pull, dvc exp run --temp): one stand-in run, found again.
    evaluate(tmp_path / "model", tmp_path / "bn", tmp_path / "eval2", tmp_path / "ev2.json", bootstrap=5,
             tracking_uri=other)
    calibrate(tmp_path / "eval2", tmp_path / "model", tmp_path / "th2.json", tmp_path / "ca2.json",
              bottlenecks=tmp_path / "bn", progress=False, tracking_uri=other)
    tracking.setup(other)
    runs = MlflowClient().search_runs(["0", *[e.experiment_id for e in MlflowClient().search_experiments()]])
    stand_ins = {r.info.run_id: r for r in runs if r.data.tags.get(tracking.MODEL_RUN_TAG) == trained_in}
    assert len(stand_ins) == 1, runs
    (run,) = stand_ins.values()
    assert "test_map" in run.data.metrics and "calibrated_test_micro_f1" in run.data.metrics
    assert run.data.tags["mltag.trained_in"] == f"sqlite:///{tmp_path / 'first.db'}"
