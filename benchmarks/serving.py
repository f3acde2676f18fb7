"""Benchmark: serving latency and batch throughput of a registered (or local) model.

1. LiteRT latency of one image on this machine's cores for each ``.tflite`` of the model
   (fp32, the shipped ``model_int8.tflite`` if any, and a dynamic-range conversion made here),
   with each file's size.
2. ``mltag predict`` throughput on ``--n`` images (the bulk path: decode pipelined, LiteRT in
   lanes) against the bottleneck step's rate on the same images (the backbone alone, computed
   into a fresh vector store the way the step does).
3. A real ``mlflow models serve`` on 127.0.0.1: p50, p95 and p99 latency and throughput at
   concurrency 1, 4 and 16, for requests of one image and of 16 images (base64 JSON).
4. ``--cold-start``: the served model's cold start, from ``mlflow models serve --env-manager uv`` to its first
   answer, in a new environment (MLflow builds it from the model's requirements), with an empty package cache
   (every wheel from the index) and with a warm one, for the model as registered and for the same model with
   TensorFlow added to its requirements (what a head-mode model carried before it was lean); with each
   environment's size on disk. Needs ``uv`` on PATH and the package index reachable.

Prints figures (the last line one JSON object with ``--json``); asserts nothing.

Usage:
    python benchmarks/serving.py --model models/train --images data/demo/images [--n 512] [--requests 60] [--json]
    python benchmarks/serving.py --model models:/mltag@champion --images DIR ...
    python benchmarks/serving.py --model models:/mltag@champion --images DIR --cold-start [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# benchmarks/bottleneck.py would shadow the PyPI package of that name, which pandas probes for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def cpu_flags() -> str:
    from mltag.tools.doctor import cpu_info

    c = cpu_info()
    return f"{c['model']}, {c['cores']} cores, AVX2 {c['avx2']}, AVX-512 {c['avx512']}"


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def litert_latency(folder: Path, pixels: np.ndarray, runs: int = 40) -> dict:
    from mltag.data.formats import read_head
    from mltag.inference.engine import LiteRTEngine, convert_backbone
    from mltag.inference.export import compose_tflite
    from mltag.tf_runtime import quiet_stderr

    files = {"fp32": folder / "model.tflite"}
    if (folder / "model_int8.tflite").is_file():
        files["shipped_int8"] = folder / "model_int8.tflite"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if (folder / "backbone").is_dir():  # both quantized kinds, for their speed (register measures accuracy)
            size = int(pixels.shape[1])
            for kind, rep in (("dynamic_range", None), ("full_int8", list(pixels))):
                lite = Path(tmp) / f"{kind}.backbone.tflite"
                with quiet_stderr():
                    convert_backbone(str(folder / "backbone"), size, lite, dynamic_range=rep is None,
                                     representative=rep)
                files[kind] = compose_tflite(lite, read_head(folder), Path(tmp) / f"{kind}.tflite")
        for name, f in files.items():
            eng = LiteRTEngine(f)
            eng(pixels[:1])
            times = []
            for i in range(runs):
                t0 = time.perf_counter()
                eng(pixels[i % len(pixels): i % len(pixels) + 1])
                times.append(time.perf_counter() - t0)
            out[name] = {"p50_ms": round(pct(times, 50), 2), "p95_ms": round(pct(times, 95), 2),
                         "bytes": f.stat().st_size}
    return out


def throughput(model_ref: str, folder: Path, files: list[Path], tracking_uri: str | None) -> dict:
    import io

    from mltag.data.formats import read_model_meta
    from mltag.inference.vectors import vectors_for
    from mltag.tools.predict import predict

    t0 = time.perf_counter()
    ok, failed = predict(model_ref, [str(f) for f in files], "csv", io.StringIO(), tracking_uri=tracking_uri,
                         progress=False)
    predict_s = time.perf_counter() - t0
    meta = read_model_meta(folder)
    with tempfile.TemporaryDirectory() as store:
        t0 = time.perf_counter()
        _, computed = vectors_for(files, meta, store, progress=False)
        step_s = time.perf_counter() - t0
    return {"images": len(files), "predict_ips": round(ok / predict_s, 1), "failed": failed,
            "step_ips": round(computed / step_s, 1), "predict_vs_step": round((ok / predict_s) / (computed / step_s), 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_load(model_uri: str, files: list[Path], requests: int, env: dict) -> dict:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow models serve did not start; see {log.name}") from None
                time.sleep(0.5)
        b64 = [base64.b64encode(f.read_bytes()).decode() for f in files[:64]]

        def body(k, i):
            rows = [[b64[(i * k + j) % len(b64)]] for j in range(k)]
            return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()

        def call(data):
            req = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
            return time.perf_counter() - t0

        call(body(1, 0))  # warm-up
        out = {}
        for k in (1, 16):
            for conc in (1, 4, 16):
                n = max(conc, requests if k == 1 else max(conc, requests // 4))
                lat, errors, lock, it = [], [], threading.Lock(), iter(range(n))

                def worker(k=k, lat=lat, errors=errors, lock=lock, it=it):
                    while True:
                        with lock:
                            i = next(it, None)
                        if i is None:
                            return
                        try:
                            t = call(body(k, i))
                        except OSError as e:  # an HTTP error or a dropped connection: counted, not timed
                            with lock:
                                errors.append(f"{type(e).__name__}: {e}"[:200])
                            continue
                        with lock:
                            lat.append(t)

                t0 = time.perf_counter()
                threads = [threading.Thread(target=worker) for _ in range(conc)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                out[f"batch{k}_c{conc}"] = {"requests": n, "failed": len(errors),
                                            "p50_ms": round(pct(lat, 50), 1) if lat else None,
                                            "p95_ms": round(pct(lat, 95), 1) if lat else None,
                                            "p99_ms": round(pct(lat, 99), 1) if lat else None,
                                            "images_per_s": round(len(lat) * k / wall, 1),
                                            "first_error": errors[0] if errors else None}
        return out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)


def model_copy(model_uri: str, dest: Path, tensorflow: bool) -> Path:
    """The MLflow model at ``model_uri`` downloaded into ``dest``; with ``tensorflow``, its requirements (all three
    files MLflow may read) get this environment's TensorFlow packages, pinned as register pins them."""
    import mlflow

    from mltag.registry.versions import TF_PACKAGES, pip_requirements

    folder = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dest)))
    if tensorflow:
        extra = [r for r in pip_requirements(True) if r.split("==")[0] in TF_PACKAGES]
        req = folder / "requirements.txt"
        req.write_text(req.read_text().rstrip("\n") + "\n" + "\n".join(extra) + "\n")
        import yaml

        env_file = folder / "python_env.yaml"
        env = yaml.safe_load(env_file.read_text())
        env["dependencies"] = list(env.get("dependencies") or []) + extra
        env_file.write_text(yaml.safe_dump(env))
    return folder


def dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6, 1)


def cold_start(folder: Path, image: Path, env_root: Path, uv_cache: Path, env: dict) -> dict:
    """Seconds from ``mlflow models serve --env-manager uv`` to the first answer of /invocations, building the
    environment in ``env_root`` (new) with ``uv_cache`` as uv's package cache."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    env = {**env, "MLFLOW_ENV_ROOT": str(env_root), "UV_CACHE_DIR": str(uv_cache)}
    body = json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(image.read_bytes()).decode()]]}}).encode()
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(folder),
                             "--env-manager", "uv", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 1800
        while True:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    r.read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow models serve did not answer; see {log.name}") from None
                time.sleep(0.2)
        first = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
    return {"first_answer_s": round(first, 1), "env_mb": dir_mb(env_root)}


def cold_starts(model_uri: str, image: Path, env: dict) -> dict:
    import shutil

    if shutil.which("uv", path=env.get("PATH")) is None:
        raise SystemExit("--cold-start needs uv on PATH (pip install uv)")
    out = {}
    with tempfile.TemporaryDirectory(prefix="mltag-cold-") as tmp:
        for name, tensorflow in (("registered", False), ("with_tensorflow", True)):
            folder = model_copy(model_uri, Path(tmp) / name, tensorflow)
            cache = Path(tmp) / f"uv-cache-{name}"
            empty = cold_start(folder, image, Path(tmp) / f"envs-{name}-1", cache, env)  # every wheel downloaded
            warm = cold_start(folder, image, Path(tmp) / f"envs-{name}-2", cache, env)  # new env, wheels cached
            out[name] = {"empty_cache": empty, "warm_cache": warm,
                         "requirements": (folder / "requirements.txt").read_text().split()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a local model folder or models:/NAME@alias")
    ap.add_argument("--images", required=True, help="a folder of images (cycled to reach --n)")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--requests", type=int, default=60, help="single-image requests per concurrency level")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--no-serve", action="store_true", help="skip the mlflow models serve part")
    ap.add_argument("--cold-start", action="store_true",
                    help="only the served model's cold start in new uv environments (a models:/ or runs:/ --model)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cold_start:
        from mltag.data.listing import expand_images
        from mltag.tracking import runs as tracking

        if not args.model.startswith(("models:/", "runs:/")):
            raise SystemExit("--cold-start needs a registered model: --model models:/NAME@ALIAS")
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(args.tracking_uri),
               "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        found, _ = expand_images([args.images])
        result = {"cpu": cpu_flags(), "model": args.model, "cold_start": cold_starts(args.model, Path(found[0]), env)}
        print(json.dumps(result) if args.json else json.dumps(result, indent=2))
        return 0
    from mltag.data.images import load_image
    from mltag.data.listing import expand_images
    from mltag.inference.model import InferenceModel
    from mltag.tools.predict import resolve_model
    from mltag.tracking import runs as tracking

    folder = resolve_model(args.model, args.tracking_uri)
    found, _ = expand_images([args.images])
    files = [Path(found[i % len(found)]) for i in range(args.n)]
    model = InferenceModel(folder)
    pixels = np.stack([load_image(f, model.image_size) for f in files[:16]])
    result = {"cpu": cpu_flags(), "model": args.model, "litert": litert_latency(folder, pixels)}
    result["bulk"] = throughput(str(folder), folder, files, args.tracking_uri)
    if not args.no_serve:
        uri = args.model if args.model.startswith(("models:/", "runs:/")) else None
        if uri is None:
            print("serving: --model is a folder; serving needs a registered model (models:/...): skipped",
                  file=sys.stderr)
        else:
            bin_dir = str(Path(sys.executable).parent)  # the server execs uvicorn from this environment
            env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(args.tracking_uri),
                   "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
            result["serve"] = serve_load(uri, files, args.requests, env)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
