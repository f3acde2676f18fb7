"""Benchmark: the whole `dvc repro` against its bottleneck stage, and a one-key `dvc exp run`.

In a temp project (this checkout's dvc.yaml and params.yaml, a fresh git + DVC repo, a fresh
vector store and, unless ``--warm-backbone``, a fresh backbone cache so the backbone is built
and converted as on a fresh clone), with ``demo.n_images`` = N:

1. ``dvc repro``: each stage's wall seconds (from the moment DVC starts it to the moment it
   starts the next, so DVC's own bookkeeping is counted too) and CPU seconds (what ``mltag``
   records with ``MLTAG_TIMINGS``), the total, and the ratio of the total to the bottleneck stage.
2. ``dvc exp run -S train.learning_rate=...``: the same table for a change of one train key, and the
   number of columns ``dvc exp show --only-changed`` prints for it.

With ``--dataset PATH`` (a label file or folder of real photos, e.g. ``../shared/devsets/products/labels.csv``)
the project reads that dataset instead of drawing demo scenes: the demo's error galleries are nearly
empty, so only real photos show what the saliency overlays and the other per-error work cost.

Prints a table per run and the CPU flags (the last line one JSON object with ``--json``);
asserts nothing.

Usage:
    python benchmarks/pipeline.py --images 2000 [--json] [--keep DIR] [--warm-backbone] [--set SECTION.KEY=VALUE]
    python benchmarks/pipeline.py --dataset ../shared/devsets/products/labels.csv --warm-backbone
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def cpu_flags() -> str:
    from mltag.tools.doctor import cpu_info

    c = cpu_info()
    return f"{c['model']}, {c['cores']} cores, AVX2 {c['avx2']}, AVX-512 {c['avx512']}"


def timed_run(cmd: str, cwd: Path, env: dict) -> tuple[dict, float, str]:
    """Run a DVC command, streaming its output: each stage's wall seconds, the total, the output."""
    timings = cwd / ".timings.jsonl"
    timings.unlink(missing_ok=True)
    env = {**env, "MLTAG_TIMINGS": str(timings)}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, bufsize=1)
    marks, lines = [], []
    for line in p.stdout:
        lines.append(line)
        m = re.search(r"Running stage '([\w-]+)'", line)
        if m:
            marks.append((m.group(1), time.perf_counter()))
    rc = p.wait()
    total = time.perf_counter() - t0
    out = "".join(lines)
    if rc != 0:
        raise SystemExit(f"{cmd} failed:\n{out[-4000:]}")
    ends = [t for _, t in marks[1:]] + [t0 + total]
    cpu = [json.loads(x) for x in timings.read_text().splitlines()] if timings.is_file() else []
    by_command: dict[str, float] = {}
    for rec in cpu:
        by_command[rec["command"]] = by_command.get(rec["command"], 0.0) + rec["cpu"]
    stages = {name: {"wall": round(end - start, 1), "cpu": round(by_command.get(name, 0.0), 1)}
              for (name, start), end in zip(marks, ends)}
    return stages, round(total, 1), out


def exp_show_columns(cwd: Path, env: dict) -> int:
    """How many columns ``dvc exp show --only-changed`` prints (its CSV header: what a person reads across)."""
    p = subprocess.run("dvc exp show --only-changed --no-pager --csv", cwd=cwd, env=env, shell=True, check=True,
                       capture_output=True, text=True)
    import csv
    import io

    return len(next(csv.reader(io.StringIO(p.stdout))))


def table(title: str, stages: dict, total: float) -> str:
    rows = [f"{title}", f"  {'stage':<12}{'wall s':>9}{'CPU s':>9}"]
    for name, s in stages.items():
        rows.append(f"  {name:<12}{s['wall']:>9.1f}{s['cpu']:>9.1f}")
    rows.append(f"  {'total':<12}{total:>9.1f}")
    bn = stages.get("bottleneck", {}).get("wall")
    if bn:
        rows.append(f"  total / bottleneck stage = {total / bn:.2f}")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="demo images (demo.n_images)")
    ap.add_argument("--lr", type=float, default=0.002, help="train.learning_rate of the one-key experiment")
    ap.add_argument("--warm-backbone", action="store_true", help="reuse the per-user backbone cache (no build)")
    ap.add_argument("--keep", default=None, help="make the project here and keep it (default: a temp folder)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a params.yaml value for the project (repeatable), e.g. backbone.handle=builtin:efficientnet_lite2_ms")
    ap.add_argument("--dataset", default=None, help="real photos (prepare.input: a label file or folder) instead of "
                    "the demo scenes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mltag-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    import yaml

    for f in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / f, work / f)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["demo"]["n_images"] = args.images
    if args.dataset:
        params["prepare"]["input"] = str(Path(args.dataset).resolve())
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in params or name not in params[section]:
            raise SystemExit(f"--set {item}: params.yaml has no key {key}")
        params[section][name] = yaml.safe_load(value)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    if not args.warm_backbone:
        env["MLTAG_BACKBONE_CACHE"] = str(work / ".backbones")
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@example.com")
    subprocess.run("git init -q && dvc init -q && dvc config core.analytics false && git add -A && "
                   "git commit -qm init", cwd=work, env=env, shell=True, check=True)
    if not args.dataset:  # the demo images are made before the clock starts: they stand for a user's dataset
        subprocess.run("dvc repro -q demo-data && git add -A && git commit -qm data", cwd=work, env=env, shell=True,
                       check=True, capture_output=True)
    repro, repro_total, _ = timed_run("dvc repro", work, env)
    subprocess.run("git add -A && git commit -qm run", cwd=work, env=env, shell=True, check=True,
                   capture_output=True)
    exp, exp_total, _ = timed_run(f"dvc exp run -S train.learning_rate={args.lr}", work, env)
    columns = exp_show_columns(work, env)
    flags = cpu_flags()
    what = f"dataset {args.dataset}" if args.dataset else f"{args.images} demo images"
    print(f"{what}{''.join(f'; {x}' for x in args.set)}; CPU: {flags}")
    print(table("dvc repro (fresh project" + (", backbone cached)" if args.warm_backbone else
                                              ", backbone built and converted in the bottleneck stage)"),
                repro, repro_total))
    print(table(f"dvc exp run -S train.learning_rate={args.lr}", exp, exp_total))
    print(f"  dvc exp show --only-changed: {columns} columns")
    result = {"images": None if args.dataset else args.images, "dataset": args.dataset, "set": args.set, "cpu": flags,
              "repro": {"stages": repro, "total": repro_total},
              "exp_run": {"stages": exp, "total": exp_total, "exp_show_only_changed_columns": columns}}
    bn = repro.get("bottleneck", {}).get("wall")
    if bn:
        result["repro"]["ratio_to_bottleneck"] = round(repro_total / bn, 3)
    if args.json:
        print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
