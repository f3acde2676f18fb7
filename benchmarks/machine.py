"""Benchmark: how fast this machine is now, to print beside any other figure.

The same code on the same VM took `make test` anywhere from 7.5 to 14 minutes from one day to the next: a shared
VM's speed varies, not only the work. Run this before and after a timing and compare the timings only where these
figures agree. Prints the CPU's model, cores and vector flags, the seconds of a 10**7-step Python loop (what Python
code, imports included, feels) and numpy's float32 matrix product in GFLOP/s on all cores; the last line one JSON
object with ``--json``; asserts nothing.

Usage:
    python benchmarks/machine.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def cpu() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return {"model": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags}


def python_loop(n: int = 10**7) -> float:
    """The best of three: seconds for ``n`` additions in a Python for loop."""
    best = float("inf")
    for _ in range(3):
        t, s = time.perf_counter(), 0
        for i in range(n):
            s += i
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    a @ a  # warm up the BLAS threads
    t = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * size**3 * repeats / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = ap.parse_args()
    out = {**cpu(), "python_loop_s": round(python_loop(), 3), "matmul_gflops": round(matmul_gflops(), 1)}
    print(f"{out['model']}, {out['cores']} cores, AVX2 {'yes' if out['avx2'] else 'no'}, "
          f"AVX-512 {'yes' if out['avx512f'] else 'no'}")
    print(f"Python loop of 10**7 steps  {out['python_loop_s']:.2f} s (best of 3)")
    print(f"float32 matmul 1024^2       {out['matmul_gflops']:.1f} GFLOP/s")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
