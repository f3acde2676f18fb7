"""Benchmark: the pipeline at scale: the whole ``dvc repro`` on N real image files (``--real``), or the steps
after bottleneck on synthetic vectors (``--sizes``): seconds, CPU seconds and peak memory per step.

``--real N[,N...]``: for each N, a fresh project (this checkout's dvc.yaml and params.yaml, a fresh git
and DVC repo, vector store and MLflow store) with N demo images drawn as files before the clock starts
(they stand for a user's photos), then a plain ``dvc repro``. Each stage's wall seconds (DVC's own
bookkeeping included), CPU seconds and peak RSS (the largest of the ``mltag`` process's VmHWM and its
children's, recorded by ``mltag`` itself with ``MLTAG_TIMINGS``), then the disk used by the vector
store, the DVC cache, ``mlflow.db`` and the reports. Then ``--add`` more images (default 1,000) and
a second ``dvc repro``: how many vectors it computed, and its stages. The backbone is built once, before
the first size (its own figure). Defaults: Lite0, 1 view (``--set`` changes any params.yaml key).
The last line is one JSON object: ``{"cpu": ..., "stages": {STAGE: {"N": {"seconds": s, "cpu_seconds": c,
"peak_rss_mb": m}}}, "disk_mb": {"N": {...}}, "add": {"N": {...}}}``.

``--sizes``:
For each size, a bottleneck folder of synthetic vectors is written in the real format
(dimension 1280 like Lite0/Lite2, 5 labels, splits 70/15/15, 4 views per training image:
the plain one and 3 augmented, float16 as the store keeps them): each label a direction,
each image the sum of its labels' directions plus noise. Then train, evaluate, calibrate
(with the out-of-fold scores review needs) and review run as the CLI runs them, each in
its own process, and each process's wall time and peak RSS (``os.wait4``) are recorded.
The backbone is a small SavedModel that maps pixels to 1280 numbers, so that train can
export its end-to-end model as it always does.

The last line is one JSON object: ``{"cpu": ..., "steps": {STEP: {"SIZE": {"seconds": s, "peak_rss_mb": m}}}}``.

Usage:
    python benchmarks/scale.py --real 10000,30000,100000 [--add 1000] [--set SECTION.KEY=VALUE] [--json]
    python benchmarks/scale.py --kfp 10000 [--shards 4] [--add 500] [--json]
    python benchmarks/scale.py --sizes 10000,100000,300000 [--epochs 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

DIM, LABELS, VIEWS = 1280, ["a", "b", "c", "d", "e"], 4


def projection_backbone(path: Path) -> Path:
    """A SavedModel: float images [B,H,W,3] in [0,1] -> [B,1280] (mean colour through a fixed projection)."""
    import tensorflow as tf

    w = tf.constant(np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32))

    class Projection(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            return tf.matmul(tf.reduce_mean(images, axis=[1, 2]), w)

    tf.saved_model.save(Projection(), str(path))
    return path


def write_bottlenecks(out: Path, n: int, backbone: Path, seed: int = 0) -> None:
    from mltag.backbones.builtin import resolve
    from mltag.data.images import PREPROCESSING_VERSION

    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(len(LABELS), DIM)).astype(np.float32)
    out.mkdir(parents=True)
    sizes = {"train": int(n * 0.7), "val": int(n * 0.15)}
    sizes["test"] = n - sizes["train"] - sizes["val"]
    for split, m in sizes.items():
        y = (rng.random((m, len(LABELS))) < 0.3).astype(np.uint8)
        y[np.arange(m), rng.integers(0, len(LABELS), m)] = 1  # at least one label each

        def vectors(shape_extra=(), m=m, y=y):
            base = np.zeros((m, *shape_extra, DIM), np.float16)
            for i in range(0, m, 20000):  # in chunks: float32 noise for 300k x 3 views would take 4.6 GB
                sl = slice(i, min(m, i + 20000))
                mean = y[sl].astype(np.float32) @ dirs
                noise = rng.normal(scale=6.0, size=(sl.stop - sl.start, *shape_extra, DIM)).astype(np.float32)
                base[sl] = (mean.reshape(len(mean), *([1] * len(shape_extra)), DIM) + noise).astype(np.float16)
            return base

        arrays = {"features": vectors(), "labels": y, "paths": np.array([f"img/{split}{i:07d}.jpg" for i in range(m)])}
        if split == "train":
            arrays["views"] = vectors((VIEWS - 1,))
        np.savez(out / f"{split}.npz", **arrays)
        del arrays
    (out / "labels.txt").write_text("\n".join(LABELS) + "\n")
    b = resolve(str(backbone))
    (out / "bottleneck.json").write_text(json.dumps({
        "backbone_handle": str(backbone), "backbone_id": b.backbone_id, "image_size": 64,
        "preprocessing": PREPROCESSING_VERSION, "views": VIEWS, "images": n, "shard": [0, 1], "config": {}}))


# The step's own peak (VmHWM of its memory map), written when it exits. Not ru_maxrss: Linux carries
# that across fork and exec, so every step would report at least this benchmark's own peak.
_MEASURED = ("import atexit, os, runpy, sys\n"
             "def _peak():\n"
             "    kb = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]\n"
             "    open(os.environ['MLTAG_PEAK_FILE'], 'w').write(kb[0] if kb else '0')\n"
             "atexit.register(_peak)\n"
             "sys.argv = ['mltag'] + sys.argv[1:]\n"
             "runpy.run_module('mltag.cli', run_name='__main__')\n")


def run_measured(args: list[str], cwd: Path, env: dict) -> dict:
    peak = cwd / "peak.txt"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _MEASURED, "-q", *args], cwd=cwd, env={**env, "MLTAG_PEAK_FILE": str(peak)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"mltag {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(int(peak.read_text()) / 1024, 0)}


REPO = Path(__file__).resolve().parents[1]
REAL_DEFAULTS = {"backbone.handle": "builtin:efficientnet_lite0", "bottleneck.views": 1}


def cpu_flags() -> str:
    from mltag.tools.doctor import cpu_info

    c = cpu_info()
    return f"{c['model']}, {c['cores']} cores, AVX2 {c['avx2']}, AVX-512 {c['avx512']}"


def _sh(cmd: str, cwd: Path, env: dict) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, shell=True, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed in {cwd}:\n{(p.stdout + p.stderr)[-4000:]}")
    return p.stdout


def timed_repro(cwd: Path, env: dict, log) -> tuple[dict, float]:
    """``dvc repro``, streamed: each stage's wall seconds (from DVC's start of it to its start of the next),
    and the CPU seconds and peak RSS that ``mltag`` recorded for it."""
    import re

    timings = cwd / ".timings.jsonl"
    timings.unlink(missing_ok=True)
    t0 = time.perf_counter()
    p = subprocess.Popen("dvc repro", cwd=cwd, env={**env, "MLTAG_TIMINGS": str(timings)}, shell=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    marks, tail = [], []
    for line in p.stdout:
        tail = (tail + [line])[-200:]
        m = re.search(r"Running stage '([\w-]+)'", line)
        if m:
            marks.append((m.group(1), time.perf_counter()))
            log(f"  stage {m.group(1)} at {time.perf_counter() - t0:.0f} s")
    if p.wait() != 0:
        raise SystemExit("dvc repro failed:\n" + "".join(tail)[-6000:])
    total = time.perf_counter() - t0
    recs = [json.loads(x) for x in timings.read_text().splitlines()] if timings.is_file() else []
    ends = [t for _, t in marks[1:]] + [t0 + total]
    stages = {}
    for (name, start), end in zip(marks, ends):
        mine = [r for r in recs if r["command"] == name]
        stages[name] = {"seconds": round(end - start, 1), "cpu_seconds": round(sum(r["cpu"] for r in mine), 1),
                        "peak_rss_mb": max((r.get("peak_rss_mb", 0) for r in mine), default=0)}
    return stages, round(total, 1)


def du_mb(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / 2**20, 1)
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1) if path.exists() else 0.0


def real(sizes: list[int], add: int, settings: dict, keep: str | None, log) -> dict:
    import shutil

    import yaml

    result = {"cpu": cpu_flags(), "set": settings, "stages": {}, "disk_mb": {}, "totals": {}, "add": {}}
    base = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="mltag-scale-real-"))
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLTAG_BACKBONE_CACHE": str(base / ".backbones"), "GIT_AUTHOR_NAME": "bench",
           "GIT_AUTHOR_EMAIL": "bench@example.com", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@example.com"}
    t0 = time.perf_counter()
    _sh(f"mltag -q backbone build {settings['backbone.handle'].removeprefix('builtin:')}", base, env)
    result["backbone_build_seconds"] = round(time.perf_counter() - t0, 1)
    for n in sizes:
        work = base / f"real{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        for f in ("dvc.yaml", "params.yaml", ".gitignore"):
            shutil.copy(REPO / f, work / f)
        params = yaml.safe_load((work / "params.yaml").read_text())
        for key, value in {**settings, "demo.n_images": n}.items():
            section, _, name = key.partition(".")
            if section not in params or name not in params[section]:
                raise SystemExit(f"--set {key}: params.yaml has no such key")
            params[section][name] = value
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        wenv = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        _sh("git init -q && dvc init -q && dvc config core.analytics false && git add -A && git commit -qm init",
            work, wenv)
        log(f"scale: drawing {n} images")
        _sh("dvc repro -q demo-data && git add -A && git commit -qm data", work, wenv)
        log(f"scale: dvc repro on {n} images")
        stages, total = timed_repro(work, wenv, log)
        stages.pop("demo-data", None)
        for stage, r in stages.items():
            result["stages"].setdefault(stage, {})[str(n)] = r
            log(f"scale: {n} images, {stage}: {r['seconds']} s, CPU {r['cpu_seconds']} s, peak {r['peak_rss_mb']:.0f} MB")
        result["totals"][str(n)] = total
        bn = json.loads((work / "metrics" / "bottleneck.json").read_text())
        result["disk_mb"][str(n)] = {
            "images": du_mb(work / "data" / "demo"), "vector_store": du_mb(work / params["bottleneck"]["cache_dir"]),
            "dvc_cache": du_mb(work / ".dvc" / "cache"), "mlflow_db": du_mb(work / "mlflow.db"),
            "reports": du_mb(work / "reports"), "largest_html_mb": max(
                (du_mb(f) for f in (work / "reports").rglob("*.html")), default=0.0)}
        result.setdefault("computed", {})[str(n)] = bn.get("computed")
        if add:
            _sh("git add -A && git commit -qm run", work, wenv)
            params["demo"]["n_images"] = n + add
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            _sh("dvc repro -q demo-data", work, wenv)
            log(f"scale: dvc repro after adding {add} images")
            again, again_total = timed_repro(work, wenv, log)
            again.pop("demo-data", None)
            bn = json.loads((work / "metrics" / "bottleneck.json").read_text())
            result["add"][str(n)] = {"images": add, "computed": bn.get("computed"), "cached": bn.get("cached"),
                                     "total_seconds": again_total, "stages": again}
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
    return result


def kfp_scale(n: int, shards: int, add: int, log) -> dict:
    """The whole Kubeflow pipeline through kfp.local on ``n`` demo images with ``shards`` bottleneck shards
    sharing one vector store, then again after adding ``add`` images: each task's seconds, and what each
    shard and the gather computed."""
    import shutil

    from mltag.config import Demo, load_params
    from mltag.data.demo import make_demo_data
    from mltag.kubeflow.run import run_local

    base = Path(tempfile.mkdtemp(prefix="mltag-scale-kfp-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'mlflow.db'}"
    data = base / "photos"
    overrides = {"bottleneck.num_shards": str(shards), "bottleneck.cache_dir": str(base / "store"),
                 "backbone.handle": "builtin:efficientnet_lite0", "bottleneck.views": "1",
                 "register.model_name": "scale-kfp"}
    result = {"cpu": cpu_flags(), "images": n, "shards": shards, "runs": []}
    try:
        for run, count in (("first", n), ("added", n + add)):
            log(f"scale: kfp.local, {count} images, {shards} shards")
            make_demo_data(data, demo=Demo(n_images=count))
            t0 = time.perf_counter()
            _, rows = run_local(data=str(data), pipeline_root=str(base / run), params=load_params(REPO / "params.yaml"),
                                overrides=overrides)
            stats = {str(f): json.loads(f.read_text()) for f in (base / run).rglob("stats.json")}
            result["runs"].append({
                "run": run, "images": count, "seconds": round(time.perf_counter() - t0, 1),
                "tasks": [{"task": r[0], "status": r[1], "seconds": round(r[2], 1)} for r in rows],
                "shards_computed": sorted(v["computed"] for k, v in stats.items() if "bottleneck-shard" in k),
                "gather_computed": sum(v["computed"] for k, v in stats.items() if "bottleneck-shard" not in k)})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return result


def real_table(r: dict) -> str:
    sizes = sorted({n for s in r["stages"].values() for n in s}, key=int)
    rows = [f"CPU: {r['cpu']}; {r['set']}; backbone built in {r['backbone_build_seconds']} s (once)",
            "stage".ljust(12) + "".join(f"{n + ' imgs: s / CPU s / peak MB':>38}" for n in sizes)]
    for stage, per in r["stages"].items():
        rows.append(stage.ljust(12) + "".join(
            f"{per[n]['seconds']:>14.1f} / {per[n]['cpu_seconds']:>8.1f} / {per[n]['peak_rss_mb']:>8.0f}"
            if n in per else " " * 38 for n in sizes))
    rows.append("total".ljust(12) + "".join(f"{r['totals'][n]:>14.1f}" + " " * 24 for n in sizes))
    for n in sizes:
        rows.append(f"disk at {n}: {r['disk_mb'][n]}")
        if n in r["add"]:
            a = r["add"][n]
            rows.append(f"+{a['images']} images at {n}: {a['computed']} vectors computed, {a['cached']} cached, "
                        f"{a['total_seconds']} s")
    return "\n".join(rows)


def gather_bytes(n: int, shard_counts: list[int], dim: int = 1280, sample: int = 2000) -> dict:
    """The gather's reads from the vector store: ``n`` vectors written by S shards (shard = index mod S, each shard
    its own packs, as the sharded bottleneck writes them), then read back in path order, the way the gather asks.
    ``bytes_read_per_vector``: with ``get_many`` (each pack once, what the steps use); ``one_by_one``: with ``get``
    on the first ``sample`` keys (a whole pack per miss, the 8 packs read last kept), for comparison."""
    import tempfile

    import numpy as np

    from mltag.data.store import FeatureCache

    out = {"vectors": n, "dim": dim, "vector_bytes": 2 * dim, "shards": {}}
    rng = np.random.default_rng(0)
    for shards in shard_counts:
        with tempfile.TemporaryDirectory() as tmp:
            writer = FeatureCache(Path(tmp) / "store", "bench", 224)
            keys = [writer.key(f"{i:08d}") for i in range(n)]
            for s in range(shards):
                mine = keys[s::shards]
                for at in range(0, len(mine), 256):
                    part = mine[at: at + 256]
                    writer.put_many(part, rng.standard_normal((len(part), dim)).astype(np.float16))
            one = FeatureCache(Path(tmp) / "store", "bench", 224)
            for k in keys[:sample]:
                one.get(k)
            many = FeatureCache(Path(tmp) / "store", "bench", 224)
            t = time.time()
            got = many.get_many(keys)
            assert len(got) == n
            out["shards"][shards] = {"bytes_read_per_vector": round(many.bytes_read / n, 1),
                                     "one_by_one_bytes_read_per_vector": round(one.bytes_read / sample, 1),
                                     "seconds": round(time.time() - t, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", default=None, metavar="N[,N...]", help="the whole dvc repro on N real image files")
    ap.add_argument("--add", type=int, default=1000, help="--real: images added before a second dvc repro (0: none)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="--real: a params.yaml value (repeatable); defaults: Lite0, 1 view")
    ap.add_argument("--keep", default=None, help="--real: make the projects here and keep them")
    ap.add_argument("--kfp", type=int, default=None, metavar="N",
                    help="the Kubeflow pipeline through kfp.local on N images, sharded, then with --add more")
    ap.add_argument("--shards", type=int, default=4, help="--kfp: bottleneck.num_shards")
    ap.add_argument("--sizes", default="10000,100000,300000", help="synthetic vectors: the steps after bottleneck")
    ap.add_argument("--epochs", type=int, default=20, help="train.epochs (early stopping may end sooner)")
    ap.add_argument("--gather", type=int, default=None, metavar="N",
                    help="the gather's bytes read per vector from N vectors written by 1, 8 and 32 shards")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.gather:
        r = gather_bytes(args.gather, [1, 8, 32])
        for shards, x in r["shards"].items():
            print(f"{shards:>3} shards: bytes_read_per_vector {x['bytes_read_per_vector']} (a vector is "
                  f"{r['vector_bytes']} bytes; one by one: {x['one_by_one_bytes_read_per_vector']}), {x['seconds']} s")
        print(json.dumps(r) if args.json else "")
        return 0
    if args.kfp:
        r = kfp_scale(args.kfp, args.shards, args.add, lambda m: print(m, file=sys.stderr, flush=True))
        for run in r["runs"]:
            print(f"{run['run']}: {run['images']} images in {run['seconds']} s; shards computed {run['shards_computed']}, "
                  f"gather computed {run['gather_computed']}")
        print(json.dumps(r) if args.json else "")
        return 0
    if args.real:
        import yaml

        settings = dict(REAL_DEFAULTS)
        for item in args.set:
            key, _, value = item.partition("=")
            settings[key] = yaml.safe_load(value)
        r = real([int(s) for s in args.real.split(",")], args.add, settings, args.keep,
                 lambda m: print(m, file=sys.stderr, flush=True))
        print(real_table(r))
        if args.json:
            print(json.dumps(r))
        return 0
    from mltag.tools.doctor import cpu_info

    c = cpu_info()
    result = {"cpu": f"{c['model']}, {c['cores']} cores, AVX2 {c['avx2']}, AVX-512 {c['avx512']}",
              "epochs": args.epochs, "dim": DIM, "views": VIEWS, "steps": {}}
    with tempfile.TemporaryDirectory(prefix="mltag-scale-") as tmp:
        tmp = Path(tmp)
        backbone = projection_backbone(tmp / "backbone")
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
        (tmp / "params.yaml").write_text(f"train:\n  epochs: {args.epochs}\nevaluate:\n  bootstrap: 200\n")
        for n in [int(s) for s in args.sizes.split(",")]:
            work = tmp / f"n{n}"
            write_bottlenecks(work / "bn", n, backbone)
            steps = {
                "train": ["train", "--bottlenecks", str(work / "bn"), "--out", str(work / "model")],
                "evaluate": ["evaluate", "--model", str(work / "model"), "--bottlenecks", str(work / "bn"),
                             "--out", str(work / "eval"), "--metrics", str(work / "ev.json")],
                "calibrate": ["calibrate", "--evaluation", str(work / "eval"), "--model", str(work / "model"),
                              "--bottlenecks", str(work / "bn"), "--out", str(work / "th.json"), "--metrics",
                              str(work / "ca.json"), "--oof", str(work / "oof.npz")],
                "review": ["review", "--oof", str(work / "oof.npz"), "--model", str(work / "model"), "--out",
                           str(work / "review"), "--metrics", str(work / "rv.json"), "--images", str(work),
                           "--thumbnails", "0"],
            }
            for step, cmd in steps.items():
                r = run_measured(cmd, tmp, env)
                result["steps"].setdefault(step, {})[str(n)] = r
                print(f"scale: {n} images, {step}: {r['seconds']} s, peak {r['peak_rss_mb']:.0f} MB", file=sys.stderr,
                      flush=True)
            ev = json.loads((work / "ev.json").read_text())
            result.setdefault("test_map", {})[str(n)] = round(ev["map"], 4)
            import shutil

            shutil.rmtree(work)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
