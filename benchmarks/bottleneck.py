"""Benchmark: bottleneck speed and memory, TF against LiteRT, in one run on one machine.

Prints a table and, with ``--json``, one JSON object as the last line:

* ``tf_forward_ips`` / ``litert_forward_ips``: the bare backbone forward pass on uint8
  pixels (TF at batch 32; LiteRT one image per invoke at the better of its two layouts,
  one interpreter with a thread per core, or one single-threaded interpreter per core each
  looping in its own thread, as the step runs it), images/s;
* ``step_cold_ips``: the whole bottleneck step (hash, decode, forward, cache writes, split
  files) on N new images with the default engine, images/s;
* ``step_warm_seconds``: the same step again, everything cached;
* ``incremental_10pct_fraction``: the step on N + 10% images (the N cached), divided by
  the cold time;
* ``peak_rss_mb`` / ``peak_rss_mb_4x``: peak resident memory of a cold step process on N
  and on 4N images;
* ``decode_ms_per_image`` / ``cache_write_ms_per_vector``: CPU time of the step's other
  work per image, each measured alone, and ``step_ceiling_fraction``, the most of the
  forward pass a cold step can reach with that work on the same cores;
* with ``--int8``, ``backbone.precision: int8``: ``int8_forward_ips``, its backbone's forward at the same layouts,
  ``step_int8_ips``, a cold step with it (in the same run as the fp32 one), and ``step_int8_ceiling_ips``, the
  most such a step could reach given the decode and cache-write costs measured (``int8_refused``: why a backbone
  has no faithful int8 model). Speed only: its accuracy on real photos is ``benchmarks/int8.py``'s.

Each step runs in a fresh process (so peak memory is that step's own), after ``os.sync()``
(so the kernel's deferred write-back of the generated images and of earlier steps does not
land inside it); the backbone is built and converted once beforehand, as it is after a
project's first run. Asserts nothing.

Usage:
    python benchmarks/bottleneck.py [--images 512] [--handle builtin:efficientnet_lite0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mltag.config import sections

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def worker(args) -> None:
    """One bottleneck step in this process; print its figures as JSON."""
    import logging

    from mltag.steps.bottleneck import bottleneck

    logging.disable(logging.WARNING)
    t = time.perf_counter()
    s = bottleneck(args.prepared, args.out, **sections("bottleneck", handle=args.handle, cache_dir=args.cache, backbone_cache_dir=args.backbone_cache, engine=args.engine, views=1, precision=args.precision), progress=False)
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "computed": s["computed"], "images": s["images"], "engine": s["engine"],
                      "peak_rss_mb": peak_rss_mb(), "tensorflow_imported": "tensorflow" in sys.modules}))


def peak_rss_mb() -> float:
    """This process image's own peak RSS (VmHWM). ru_maxrss would include the RSS of the parent it was forked from."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(tmp: Path, prepared: Path, out: str, cache: str, handle: str, engine: str, precision: str = "fp32") -> dict:
    # What earlier work wrote (the generated images, the last step's packs) is flushed first: the
    # kernel writes dirty pages back about 30 s later, which would land inside this measurement.
    os.sync()
    cmd = [sys.executable, __file__, "--worker", "--prepared", str(prepared), "--out", str(tmp / out),
           "--cache", str(tmp / cache), "--backbone-cache", str(tmp / "backbones"), "--handle", handle,
           "--engine", engine, "--precision", precision]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def forward_ips(engine, image_size: int, batch: int, seconds: float = 5.0) -> float:
    import numpy as np

    x = np.random.default_rng(0).integers(0, 255, (batch, image_size, image_size, 3), dtype=np.uint8)
    engine(x)  # warm up (trace, allocate)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        engine(x)
        n += batch
    return n / (time.perf_counter() - t)


def lanes_forward_ips(engine, image_size: int, seconds: float = 5.0) -> float:
    """Images/s of ``engine.lanes()``, each lane looping on one image in its own thread."""
    import threading

    import numpy as np

    x = np.random.default_rng(0).integers(0, 255, (1, image_size, image_size, 3), dtype=np.uint8)
    runs = engine.lanes()
    for run in runs:
        run(x)  # warm up (allocate)
    counts = [0] * len(runs)
    t = time.perf_counter()

    def loop(i: int) -> None:
        while time.perf_counter() - t < seconds:
            runs[i](x)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(runs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(counts) / (time.perf_counter() - t)


def per_image_costs(prepared: Path, size: int, cache_dir: Path, dim: int) -> dict:
    """CPU milliseconds per image of the step's work besides the forward, each measured alone on one
    thread: decode and resize (the step's own function, on the prepared images), and the cache write
    per vector (batches of 32, one pack file each, into a fresh cache as on a first run)."""
    import numpy as np

    from mltag.data.formats import image_root_of, load_hashes
    from mltag.data.store import FeatureCache
    from mltag.inference.lanes import decode_view

    root, hashes = image_root_of(prepared), sorted(load_hashes(prepared).items())
    decode_view(root / hashes[0][0], hashes[0][1], 0, size)  # first-call set-up is not per image
    t = time.process_time()
    for rel, sha in hashes:
        decode_view(root / rel, sha, 0, size)
    decode_ms = (time.process_time() - t) / len(hashes) * 1e3
    cache = FeatureCache(cache_dir, "bench", size)
    keys = [cache.key(sha) for _, sha in hashes]
    vecs = np.random.default_rng(0).random((len(keys), dim), dtype=np.float32)
    t = time.process_time()
    for i in range(0, len(keys), 32):
        cache.put_many(keys[i: i + 32], vecs[i: i + 32])
    write_ms = (time.process_time() - t) / len(hashes) * 1e3
    return {"decode_ms": round(decode_ms, 3), "cache_write_ms": round(write_ms, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--handle", default="builtin:efficientnet_lite0")
    ap.add_argument("--engine", default="auto", help="engine of the step runs")
    ap.add_argument("--int8", action="store_true", help="also backbone.precision int8: its forward and a cold step")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepared", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--backbone-cache", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import logging

    logging.disable(logging.WARNING)
    import numpy as np

    from mltag.backbones.builtin import default_image_size, resolve
    from mltag.data.demo import make_demo_data
    from mltag.inference.engine import LiteRTEngine, TFEngine, backbone_engine, litert_backbone, tflite_path
    from mltag.steps.prepare import prepare
    from mltag.workers import cpu_threads

    n = args.images
    size = default_image_size(args.handle)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Demo scenes (about 290x230 JPEGs); make_demo_data(n) is a prefix of make_demo_data(m > n).
        for name, count in (("n", n), ("n10", n + max(1, n // 10)), ("n4", 4 * n)):
            make_demo_data(tmp / f"demo-{name}", **sections("demo-data", n_images=count))
            prepare(tmp / f"prep-{name}", **sections("prepare", input=tmp / f"demo-{name}"), progress=False)
        bb = resolve(args.handle, tmp / "backbones")
        lite = backbone_engine("litert", bb, size, tmp / "backbones")  # converts once, as a first run does
        if not isinstance(lite, LiteRTEngine):
            raise SystemExit("LiteRT could not convert this backbone")
        lite_file = tflite_path(bb, size, tmp / "backbones")
        # The bare forward pass at the engine's best layout: the larger of one interpreter with a
        # thread per core and one single-threaded interpreter per core in its own thread (the
        # step's lanes).
        cores = cpu_threads()
        os.sync()  # the generated images' write-back happens now, not inside the measurements
        per_layout = {"1x1 per core": lanes_forward_ips(LiteRTEngine(lite_file, threads=1, parallel=cores), size),
                      f"{cores} threads x1": forward_ips(LiteRTEngine(lite_file, threads=cores, parallel=1), size,
                                                         cores)}
        litert_ips = max(per_layout.values())
        int8_ips, int8_refused = None, None
        if args.int8:
            from mltag.backbones.builtin import with_precision
            from mltag.errors import MltagError

            try:  # backbone.precision int8's own model (calibrated, checked for faithfulness), as the step gets it
                int8_file = litert_backbone(with_precision(bb, "int8"), size, tmp / "backbones")
                int8_ips = max(lanes_forward_ips(LiteRTEngine(int8_file, threads=1, parallel=cores), size),
                               forward_ips(LiteRTEngine(int8_file, threads=cores, parallel=1), size, cores))
            except MltagError as e:
                int8_refused = str(e)
        tf_ips = forward_ips(TFEngine(bb.location), size, 32)
        dim = int(lite(np.zeros((1, size, size, 3), np.uint8)).shape[1])
        costs = per_image_costs(tmp / "prep-n", size, tmp / "write-cache", dim)

        cold = step(tmp, tmp / "prep-n", "bn", "cache", args.handle, args.engine)
        warm = step(tmp, tmp / "prep-n", "bn", "cache", args.handle, args.engine)
        incr = step(tmp, tmp / "prep-n10", "bn10", "cache", args.handle, args.engine)
        big = step(tmp, tmp / "prep-n4", "bn4", "cache4", args.handle, args.engine)
        cold8 = step(tmp, tmp / "prep-n", "bn8", "cache8", args.handle, args.engine, "int8") if int8_ips else None

    forward_ms = cores / litert_ips * 1e3
    ceiling = forward_ms / (forward_ms + costs["decode_ms"] + costs["cache_write_ms"])
    from mltag.tools.doctor import cpu_info

    c = cpu_info()
    result = {
        "cpu": f"{c['model']}, {c['cores']} cores, AVX2 {c['avx2']}, AVX-512 {c['avx512']}",
        "handle": args.handle, "images": n, "image_size": size, "engine": cold["engine"],
        "tf_forward_ips": round(tf_ips, 1),
        "litert_forward_ips": round(litert_ips, 1),
        "litert_forward_ips_by_layout": {k: round(v, 1) for k, v in per_layout.items()},
        "step_cold_ips": round(cold["computed"] / cold["seconds"], 1),
        "step_warm_seconds": round(warm["seconds"], 2),
        "incremental_10pct_fraction": round(incr["seconds"] / cold["seconds"], 3),
        "incremental_computed": incr["computed"],
        "peak_rss_mb": round(cold["peak_rss_mb"]),
        "peak_rss_mb_4x": round(big["peak_rss_mb"]),
        "step_4x_ips": round(big["computed"] / big["seconds"], 1),
        "cpu_threads": cores,
        # CPU ms per image besides the forward, and the cold step's ceiling they imply:
        # forward / (forward + decode + write), the forward costing cores / litert_forward_ips.
        "decode_ms_per_image": costs["decode_ms"],
        "cache_write_ms_per_vector": costs["cache_write_ms"],
        "step_ceiling_fraction": round(ceiling, 3),
    }
    if int8_ips:
        int8_ms = cores / int8_ips * 1e3
        result["int8_forward_ips"] = round(int8_ips, 1)
        result["step_int8_ips"] = round(cold8["computed"] / cold8["seconds"], 1)
        result["step_int8_ceiling_ips"] = round(cores / (int8_ms + costs["decode_ms"] + costs["cache_write_ms"]) * 1e3, 1)
    elif int8_refused:
        result["int8_refused"] = int8_refused
    print(f"bottleneck benchmark: {args.handle} at {size} px, {n} demo images, {result['cpu_threads']} CPU threads "
          f"({result['cpu']})")
    print(f"  backbone forward, TF (batch 32):        {result['tf_forward_ips']:8.1f} images/s")
    print(f"  backbone forward, LiteRT (best layout): {result['litert_forward_ips']:8.1f} images/s "
          f"({litert_ips / tf_ips:.1f}x TF; {', '.join(f'{k} {v:.0f}' for k, v in per_layout.items())})")
    print(f"  bottleneck step, cold ({result['engine']}):      {result['step_cold_ips']:8.1f} images/s "
          f"({result['step_cold_ips'] / litert_ips:.0%} of the LiteRT forward pass)")
    print(f"  bottleneck step, warm:                  {result['step_warm_seconds']:8.2f} s for {n} images")
    print(f"  +10% images ({incr['computed']} computed):         {result['incremental_10pct_fraction']:8.3f} "
          f"of the cold time")
    print(f"  peak memory, cold step:                 {result['peak_rss_mb']:8d} MB ({n} images), "
          f"{result['peak_rss_mb_4x']} MB ({4 * n} images)")
    print(f"  CPU per image besides the forward:      decode+resize {costs['decode_ms']:.2f} ms, cache write "
          f"{costs['cache_write_ms']:.2f} ms, against {forward_ms:.2f} core-ms for the forward: the cold step "
          f"can reach at most {ceiling:.0%} of the forward pass")
    if int8_ips:
        print(f"  backbone forward, LiteRT full int8:     {int8_ips:8.1f} images/s ({int8_ips / litert_ips:.2f}x fp32)")
        print(f"  bottleneck step, cold, precision int8:  {result['step_int8_ips']:8.1f} images/s "
              f"({result['step_int8_ips'] / result['step_cold_ips']:.2f}x the fp32 step; its ceiling "
              f"{result['step_int8_ceiling_ips']:.1f})")
    elif int8_refused:
        print(f"  precision int8: refused: {int8_refused}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
