"""The ``mltag`` command: one subcommand per step, plus predict, promote, backbone and pipeline."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

from mltag.errors import MltagError, Terminated
from mltag.logs import setup_logging

# Paths each step reads and writes (defaults match dvc.yaml).
STEP_PATHS = {
    "demo-data": [("--out", "data/demo")],
    "prepare": [("--out", "data/prepared")],
    "bottleneck": [("--prepared", "data/prepared"), ("--out", "data/bottlenecks"), ("--images", None),
                   ("--metrics", None)],
    "train": [("--bottlenecks", "data/bottlenecks"), ("--prepared", "data/prepared"), ("--out", "models/train"),
              ("--metrics", None),
              ("--history", None)],
    "evaluate": [("--model", "models/train"), ("--bottlenecks", "data/bottlenecks"), ("--prepared", "data/prepared"),
                 ("--out", "reports/evaluate"), ("--metrics", "metrics/evaluate.json"), ("--plots", None)],
    "calibrate": [("--evaluation", "reports/evaluate"), ("--model", "models/train"), ("--bottlenecks", "data/bottlenecks"),
                  ("--out", "models/thresholds.json"), ("--metrics", "metrics/calibrate.json"),
                  ("--oof", "reports/calibrate/oof_scores.npz"), ("--report", "reports/calibrate/details.json")],
    "register": [("--model", "models/train"), ("--thresholds", "models/thresholds.json"),
                 ("--prepared", "data/prepared"), ("--out", "reports/register.json"),
                 ("--metrics", "metrics/register.json"), ("--images", None),
                 ("--bottlenecks", None), ("--card", "reports/model_card.md")],
    "review": [("--oof", "reports/calibrate/oof_scores.npz"), ("--prepared", "data/prepared"), ("--model", "models/train"),
               ("--out", "reports/review"), ("--metrics", "metrics/review.json"), ("--images", None)],
}


def step_flags(step: str) -> list[tuple[list[str], str, str]]:
    """The generated config flags of a step: ``([--section.key, --key], "section.key", help)``.

    Every key of every section the step reads is ``--section.key``; it is also ``--key``
    (dashes for underscores), e.g. ``--val-fraction``, or ``--section-key`` where two sections
    share the key's name (``--backbone-cache-dir``).
    """
    from mltag.config import STEP_SECTIONS, choices, flag_names, section_fields

    names = iter(flag_names(step))
    out = []
    for section in STEP_SECTIONS[step]:
        for key, f in section_fields(section).items():
            alias = "--" + next(names).replace("_", "-")
            allowed = choices(section, key)
            hlp = (f.description + (f" ({', '.join(allowed)})" if allowed else "")).replace("%", "%%")
            out.append(([f"--{section}.{key}", alias], f"{section}.{key}", hlp))
    return out


def _resolve(args, step: str):
    """params.yaml (or --params) overlaid with the flags given on the command line."""
    from mltag.config import load_params, params_from_dict

    given: dict[str, dict] = {}
    for _, key, _ in step_flags(step):
        v = getattr(args, key, None)
        if v is not None:
            section, name = key.split(".")
            given.setdefault(section, {})[name] = v
    # each section's flags at once: a rule across keys (calibrate.method min_precision needs
    # calibrate.min_precision) sees them together
    return params_from_dict(given, "command line", base=load_params(args.params))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mltag", description="Multi-label image classification by transfer learning.")
    p.add_argument("--params", default=None, help="params file (default: ./params.yaml when present)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                         "else sqlite:///./mlflow.db)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages, and tracebacks with errors")
    from mltag import __version__

    p.add_argument("--version", action="version", version=f"mltag {__version__}")
    # -q and -v also after a subcommand (`mltag train -v`); SUPPRESS keeps a flag given before it.
    anywhere = argparse.ArgumentParser(add_help=False)
    anywhere.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    anywhere.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = _Subparsers(p.add_subparsers(dest="command", required=True), anywhere)
    _add_steps(sub)
    _add_tools(sub)
    _add_project_commands(sub)
    return p


def _add_steps(sub) -> None:
    """One subcommand per step: its paths, and a flag per params key of its sections."""
    for step in STEP_PATHS:
        sp = sub.add_parser(step, help=f"run the {step} step")
        sp.add_argument("--params", default=argparse.SUPPRESS, help="params file (default: ./params.yaml)")
        for flag, default in STEP_PATHS[step]:
            sp.add_argument(flag, default=default, help=f"path (default: {default})")
        for flags, key, hlp in step_flags(step):
            sp.add_argument(*flags, dest=key, default=None, metavar="VALUE", help=f"{hlp} (params: {key})")
        if step == "prepare":
            sp.add_argument("--dataset-version", default=None, help="dataset revision to record in the report")
        if step == "review":
            sp.add_argument("action", nargs="?", choices=["apply"],
                            help="apply: write a corrected label file from --accept (no action: rank the issues)")
            sp.add_argument("--accept", default=None, metavar="CSV",
                            help="apply: the label_issues.csv rows you agree with (delete the others)")
            sp.add_argument("--input", default=None, help="apply: the dataset (default: prepare.input)")
            sp.add_argument("--format", dest="apply_format", default=None, help="apply: the dataset's format "
                            "(default: prepare.format)")
            sp.add_argument("--to", default=None, help="apply: where to write (default: beside the original)")
        if step == "bottleneck":
            sp.add_argument("--shard-index", type=int, default=None,
                            help="compute only this shard (of bottleneck.num_shards) into the cache")
            sp.add_argument("--extra-cache", action="append", default=[], help="read-only feature cache (gather)")


def _add_tools(sub) -> None:
    """predict, suggest, metrics, promote, doctor."""
    pr = sub.add_parser("predict", help="label images with a registered or local model")
    pr.add_argument("images", nargs="+", help="image files, folders (recursive), globs ('new/*.jpg') or .txt files "
                                              "listing images")
    pr.add_argument("--model", default=None,
                    help="models:/NAME@champion (default, NAME from params), runs:/..., a local model folder "
                         "or a .tflite file inside one")
    pr.add_argument("--format", choices=["text", "csv", "jsonl"], default="text",
                    help="text (a line per image), csv (path, labels, error, score per label) or jsonl")
    pr.add_argument("--json", action="store_true", help="the same as --format jsonl")
    pr.add_argument("--out", default=None, help="write the rows here (written whole when done) instead of stdout")
    from mltag.config import choices

    pr.add_argument("--tta", choices=choices("evaluate", "tta"), default="none",
                    help="test-time augmentation: combine 10 crops/mirrors by mean or max")
    pr.add_argument("--explain", default=None, metavar="DIR",
                    help="also write an occlusion-saliency overlay PNG per image and chosen label into DIR "
                         "(26 forward passes per image)")
    sg = sub.add_parser("suggest", help="rank unlabelled images for labelling (uncertainty, then diversity)")
    sg.add_argument("--model", default=None, help="models:/NAME@champion (default, NAME from params), runs:/... or "
                                                  "a local model folder")
    sg.add_argument("--images", required=True, help="a folder (recursive), a glob ('new/*.jpg') or a file listing "
                                                    "images")
    sg.add_argument("--n", type=int, default=100, help="how many to suggest (default 100)")
    sg.add_argument("--out", default="suggest.csv", help="CSV, most worth labelling first (default suggest.csv)")
    sg.add_argument("--params", default=argparse.SUPPRESS, help="params file (default: ./params.yaml)")
    dft = sub.add_parser("drift", help="do new images still look like the training images? exit 3 when not")
    dft.add_argument("images", nargs="+", help="image files, folders (recursive), globs or .txt files listing images")
    dft.add_argument("--model", default=None, help="models:/NAME@champion (default, NAME from params) or a model folder")
    dft.add_argument("--bottlenecks", default="data/bottlenecks", help="the model's bottleneck folder: its training "
                                                                       "vectors and test split (default data/bottlenecks)")
    dft.add_argument("--out", default="reports/drift", help="drift.json and drift.html here (default reports/drift)")
    dft.add_argument("--alpha", type=float, default=0.01, help="significance of each test (default 0.01)")
    dft.add_argument("--permutations", type=int, default=500, help="permutations of the vector test (default 500)")
    dft.add_argument("--max-images", type=int, default=1000, help="vectors compared per side (default 1000)")
    dft.add_argument("--params", default=argparse.SUPPRESS, help="params file (default: ./params.yaml)")
    ms = sub.add_parser("metrics", help="print the last run's metrics table and registry decision")
    ms.add_argument("--evaluate", default="reports/evaluate/details.json", help="evaluate's details.json")
    ms.add_argument("--calibrate", default="reports/calibrate/details.json", help="calibrate's --report")
    ms.add_argument("--register", default="reports/register.json", help="register's --out")
    pm = sub.add_parser("promote", help="make VERSION the champion by hand, recording who and why")
    pm.add_argument("name")
    pm.add_argument("version")
    pm.add_argument("--reason", required=True)
    pm.add_argument("--user", default=None)
    dr = sub.add_parser("doctor", help="check this machine before a long run: packages, CPU, engines and their "
                                       "speed, GPU, tracking server, vector store, output folders, DVC")
    dr.add_argument("--no-measure", action="store_true", help="skip the 16-image forward-rate measurement")
    dr.add_argument("--params", default=argparse.SUPPRESS, help="params file (default: ./params.yaml)")


def _add_project_commands(sub) -> None:
    """params, backbone and pipeline tools."""
    pa = sub.add_parser("params", help="params.yaml tools: its JSON Schema, its reference table, a check")
    pas = pa.add_subparsers(dest="params_command", required=True)
    pas.add_parser("schema", help="print the JSON Schema of params.yaml (for editors: docs/params.schema.json)")
    prf = pas.add_parser("reference", help="print the parameter reference (Markdown, as in docs/configuration.md)")
    prf.add_argument("--write", metavar="FILE", default=None,
                     help="replace the reference between the params-reference markers of this file instead")
    pck = pas.add_parser("check", help="check a params file: every key known, every value valid")
    pck.add_argument("file", nargs="?", default="params.yaml")
    bb = sub.add_parser("backbone", help="backbone tools")
    bbs = bb.add_subparsers(dest="backbone_command", required=True)
    bd = bbs.add_parser("build", help="build a built-in backbone into a SavedModel folder")
    bd.add_argument("name", help="efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2 (each also with _ms)")
    bd.add_argument("--out", default=None, help="a SavedModel folder (default: the backbone cache, where the steps "
                                                "look, plus its LiteRT conversion)")
    pl = sub.add_parser("pipeline", help="the Kubeflow pipeline")
    pls = pl.add_subparsers(dest="pipeline_command", required=True)
    pc = pls.add_parser("compile", help="write the compiled pipeline YAML")
    pc.add_argument("--out", default=None, help="default: pipeline/pipeline.yaml (pipeline/batch_predict.yaml with "
                                                "--batch-predict)")
    pc.add_argument("--batch-predict", action="store_true",
                    help="the batch-prediction pipeline: a list of images sharded across tasks, one predictions file")
    pc.add_argument("--drift", action="store_true", help="the drift pipeline: one `mltag drift` task, for a "
                                                          "recurring run over a folder or bucket prefix")
    pc.add_argument("--allow-dirty", action="store_true",
                    help="compile even though mltag's source has uncommitted changes (the image tag names the source)")
    pc.add_argument("--params", default=argparse.SUPPRESS, help="params file (default: ./params.yaml)")
    pr2 = pls.add_parser("run", help="run locally (kfp.local) or submit to a KFP endpoint")
    g = pr2.add_mutually_exclusive_group(required=True)
    g.add_argument("--local", action="store_true", help="run every step on this machine with kfp.local")
    g.add_argument("--host", default=None, help="KFP endpoint URL")
    pr2.add_argument("--experiment", default="mltag")
    pr2.add_argument("--data", default="data/demo", help="dataset path/URI (or path inside --data-repo)")
    pr2.add_argument("--data-repo", default="", help="git URL of a DVC-versioned dataset")
    pr2.add_argument("--data-rev", default="", help="revision of --data-repo")
    pr2.add_argument("--pipeline-root", default=None, help="local artifact folder for --local")
    pr2.add_argument("--allow-dirty", action="store_true", help="--host: submit even though mltag's source has "
                                                                 "uncommitted changes")
    pr2.add_argument("--cache", action="store_true",
                     help="--local: reuse a task's outputs when its inputs and code are unchanged (kfp.local's cache)")
    pr2.add_argument("--params", default=argparse.SUPPRESS, help="params file (default: ./params.yaml)")
    pr2.add_argument("--arg", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="pipeline parameter override, e.g. train.epochs=50")
    pr2.add_argument("--batch-predict", action="store_true",
                     help="--local: run the batch-prediction pipeline on --images with --model, in --shards tasks")
    pr2.add_argument("--images", default=None, help="--batch-predict: a folder, glob or list file of images")
    pr2.add_argument("--model", default=None, help="--batch-predict: models:/NAME@champion (default, NAME from "
                                                    "params) or a model folder")
    pr2.add_argument("--shards", type=int, default=4, help="--batch-predict: prediction tasks (default 4)")


class _Subparsers:
    """``add_subparsers()`` whose every parser, nested ones too, also takes the ``-q``/``-v`` flags."""

    def __init__(self, action, parent: argparse.ArgumentParser):
        self._action, self._parent = action, parent

    def add_parser(self, name: str, **kw) -> argparse.ArgumentParser:
        sp = self._action.add_parser(name, parents=[self._parent], **kw)
        parent, add = self._parent, sp.add_subparsers

        def add_subparsers(**skw):
            return _Subparsers(add(**skw), parent)

        sp.add_subparsers = add_subparsers
        return sp


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported anywhere
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import warnings

    # tensorflow_hub still imports pkg_resources: its deprecation warning says nothing to a user of mltag.
    # Set before any thread starts (see mltag.backbones.builtin.tensorflow_hub).
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    if "-v" not in (argv or sys.argv) and "--verbose" not in (argv or sys.argv):
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    try:
        return _dispatch(args)
    except MltagError as e:
        return _user_error(str(e), args.verbose)
    except OSError as e:  # a user path: permission, read-only, disk full, not found
        e = _first_copy_error(e)
        hint = _OS_HINTS.get(e.errno)
        if hint is None:
            raise  # not about a path the user gave (E2BIG, EBADF...): a bug, and its traceback matters
        where = f"{e.filename}: " if e.filename else ""
        return _user_error(f"{where}{e.strerror or e} ({hint})", args.verbose)
    except Exception as e:
        if not any(c.__name__ == "MlflowException" for c in type(e).__mro__):  # subclasses too (RestException)
            raise  # a bug: the traceback matters
        from mltag.tracking.runs import mask_uri, scrub, tracking_uri

        uri = tracking_uri(args.tracking_uri)
        return _user_error(f"MLflow at {mask_uri(uri)}: {scrub(str(e).splitlines()[0][:300], uri)}", args.verbose)
    except KeyboardInterrupt:
        print("mltag: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except Terminated:
        print("mltag: terminated (SIGTERM); the step stopped, a run it still had open ended as KILLED, and "
              "nothing half-written was left behind", file=sys.stderr)
        return 143
    finally:
        _record_timing(args if "args" in locals() else None, t0, cpu0)


def _first_copy_error(e: OSError) -> OSError:
    """``shutil.copytree`` gathers every file's error into one ``shutil.Error`` (a list, no errno): the first
    one, as the ``OSError`` it was, so a full disk under ``--out`` reads as one line like any other."""
    import shutil

    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        src, dst, why = (list(e.args[0][0]) + ["", "", ""])[:3]
        for code, name in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
                           (errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")):
            if name in str(why):
                return OSError(code, f"{name} (copying {len(e.args[0])} file(s), the first {src})", dst)
    return e


_OS_HINTS = {  # the errors a user's path can cause, and what to check
    errno.ENOENT: "check the path", errno.ENOTDIR: "check the path", errno.EISDIR: "check the path",
    errno.ENAMETOOLONG: "check the path", errno.ELOOP: "check the path's symlinks",
    errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
    errno.EROFS: "the file system is read-only", errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
    errno.EEXIST: "check the path", errno.EXDEV: "check the path", errno.EIO: "check the disk",
}


def _cpu_seconds() -> float:
    import resource

    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def _peak_rss_mb() -> float:
    """The larger of this process's own peak (VmHWM) and its largest child's (a helper, a forked refit)."""
    import resource

    own = 0
    try:
        with open("/proc/self/status") as f:
            own = next((int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")), 0)
    except OSError:
        pass
    return round(max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024, 1)


def _record_timing(args, t0: float, cpu0: float) -> None:
    """With ``MLTAG_TIMINGS=FILE``, append this command's wall and CPU seconds and peak RSS (benchmarks/)."""
    path = os.environ.get("MLTAG_TIMINGS")
    if not path or args is None:
        return
    rec = {"command": args.command, "wall": round(time.perf_counter() - t0, 2),
           "cpu": round(_cpu_seconds() - cpu0, 2), "pid": os.getpid(), "peak_rss_mb": _peak_rss_mb()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def _user_error(message: str, verbose: bool) -> int:
    """One line on stderr and exit status 2; ``-v`` adds the traceback."""
    if verbose:
        import traceback

        traceback.print_exc()
    print(f"mltag: error: {message}", file=sys.stderr)
    return 2


def _dispatch(args) -> int:
    cmd = args.command
    if cmd == "backbone" and not args.verbose:
        # TF's C++ logs a few startup lines (oneDNN, "could not find cuda drivers") before any
        # Python-side setting applies; -v shows them. Other commands import TF only when they
        # need it (mltag.tf_runtime, as quietly), or never (train in head mode).
        from mltag.tf_runtime import import_tensorflow

        import_tensorflow()
    progress = not args.quiet
    if cmd in STEP_PATHS:
        return _run_step(cmd, args, progress)
    if cmd == "predict":
        return _predict(args)
    if cmd == "drift":
        from mltag.config import load_params, model_name
        from mltag.tools.drift import drift

        params = load_params(args.params)
        r = drift(args.model or f"models:/{model_name(params)}@champion", args.images, args.out,
                  bottlenecks=args.bottlenecks, store=params.bottleneck.cache_dir,
                  backbone_cache_dir=params.backbone.cache_dir, engine=params.bottleneck.engine, alpha=args.alpha,
                  permutations=args.permutations, max_images=args.max_images, tracking_uri=args.tracking_uri,
                  progress=not args.quiet)
        v = r["vectors"]
        shifted = [s["label"] for s in r["label_shifts"] or [] if s["shifted"]]
        print(f"drift: {'FOUND' if r['drift'] else 'none found'}: vectors MMD p={v['p_value']:.4f} (domain AUC "
              f"{v['auc']:.3f}); labels shifted: {', '.join(shifted) or 'none'}; report in {args.out}/drift.html")
        return 3 if r["drift"] else 0
    elif cmd == "suggest":
        from mltag.config import load_params, model_name
        from mltag.tools.suggest import suggest

        params = load_params(args.params)
        r = suggest(args.model or f"models:/{model_name(params)}@champion", args.images, args.n, args.out,
                    store=params.bottleneck.cache_dir, backbone_cache_dir=params.backbone.cache_dir,
                    engine=params.bottleneck.engine, tracking_uri=args.tracking_uri, progress=not args.quiet)
        print(f"suggest: the {r['suggested']} of {r['images']} images most worth labelling are in {args.out} "
              f"({r['computed']} vectors computed); label them in {r['page']}"
              + (f"; {len(r['unreadable'])} unreadable image(s) left out" if r["unreadable"] else ""))
    elif cmd == "metrics":
        _show_metrics(args)
    elif cmd == "promote":
        from mltag.registry.versions import promote

        print(json.dumps(promote(args.name, args.version, args.reason, args.user, args.tracking_uri)))
    elif cmd == "doctor":
        from mltag.config import Params, load_params
        from mltag.tools.doctor import doctor

        try:
            params, problem = load_params(args.params), None
        except MltagError as e:
            params, problem = Params(), str(e)
        return doctor(params, args.tracking_uri, measure=not args.no_measure, params_problem=problem)
    elif cmd == "backbone":
        from mltag.backbones.builtin import build_builtin

        if args.out is None:
            from mltag.backbones.builtin import default_image_size, resolve
            from mltag.config import load_params
            from mltag.inference.engine import backbone_engine, litert_backbone

            cache = load_params(args.params).backbone.cache_dir
            resolved = resolve(f"builtin:{args.name}", cache)
            backbone_engine("litert", resolved, default_image_size(args.name), cache)
            try:  # what register quantizes (register.int8: dynamic_range), so no register converts it again
                litert_backbone(resolved, default_image_size(args.name), cache, kind="dynamic_range")
                kinds = "fp32 and dynamic range"
            except MltagError as e:
                print(f"backbone: no dynamic-range conversion ({e})", file=sys.stderr)
                kinds = "fp32"
            print(f"backbone: {args.name} built in {resolved.location} (and converted for LiteRT: {kinds})")
        else:
            out = build_builtin(args.name, args.out)
            print(f"backbone: {args.name} written to {out}")
    elif cmd == "params":
        from mltag import config

        if args.params_command == "schema":
            print(json.dumps(config.json_schema(), indent=2))
        elif args.params_command == "reference" and args.write:
            config.write_reference(args.write)
        elif args.params_command == "reference":
            print(config.reference_markdown(), end="")
        else:
            config.load_params(args.file)
            print(f"{args.file}: every key known, every value valid")
    elif cmd == "pipeline":
        return _pipeline(args)
    return 0


def _run_step(step: str, args, progress: bool) -> int:
    """One step through the same entry as the Kubeflow components (``mltag.steps.run_step``)."""
    from mltag.steps import run_step

    params = _resolve(args, step)
    rt = {k: getattr(args, k) for k in _TAKES if step in _TAKES[k]}
    if step in ("train", "evaluate", "calibrate", "register", "review"):
        rt["metrics_file"] = args.metrics
    if step in ("train", "evaluate", "calibrate", "register", "review"):
        rt["tracking_uri"] = args.tracking_uri
    if step in ("prepare", "bottleneck", "train", "calibrate", "review"):
        rt["progress"] = progress
    if step == "demo-data":
        out = run_step(step, params, **rt)
        print(f"demo-data: {params.demo.n_images} images in {out}")
    elif step == "prepare":
        from mltag.data.fetch import git_rev

        rt["dataset_version"] = args.dataset_version or git_rev(params.prepare.input)
        r = run_step(step, params, **rt)
        print(f"prepare: {r['images_used']} images ({r['format']}): {r['images_per_split']}; "
              f"{len(r['rejected'])} rejected; report in {args.out}/report.html")
    elif step == "bottleneck":
        rt.update(images=args.images, extra_caches=args.extra_cache, shard_index=args.shard_index or 0)
        if args.shard_index is None:  # bottleneck.num_shards is the Kubeflow fan-out; locally one run does it all
            params = params.replace("bottleneck", num_shards=1)
        run_step(step, params, **rt)
    elif step == "train":
        root = _image_root(args.prepared)
        s = run_step(step, params, **rt, history_file=args.history, images=root,
                     dataset=dataset_source(args.prepared) if root else None)
        ft = (f"; fine-tune best epoch {s['fine_tune_best_epoch']}/{s['fine_tune_epochs_run']}, val loss "
              f"{s['fine_tune_val_loss']:.4f}" if s.get("fine_tune_val_loss") is not None else "")
        val = f"{s['val_loss']:.4f}" if s["val_loss"] is not None else "n/a"
        print(f"train: head best epoch {s['best_epoch']}/{s['epochs_run']}, val loss {val}{ft}, "
              f"MLflow run {s['run_id']}")
    elif step == "evaluate":
        run_step(step, params, **rt, model_dir=args.model, images=_image_root(args.prepared), plots=args.plots)
    elif step == "calibrate":
        run_step(step, params, **rt, model_dir=args.model, oof_out=args.oof)
    elif step == "review" and args.action == "apply":
        from mltag.steps.review import apply_review

        if not args.accept:
            raise MltagError("review apply needs --accept FILE (the label_issues.csv rows you agree with)")
        target = apply_review(args.accept, args.input or params.prepare.input,
                              args.apply_format or params.prepare.format, args.to)
        print(f"review apply: corrected labels in {target}; set prepare.input to it (or --input) and run dvc repro")
    elif step == "review":
        run_step(step, params, **rt, model_dir=args.model, images=args.images)  # its log line says what it found
    elif step == "register":
        r = run_step(step, params, **rt, model_dir=args.model, images=args.images)
        if r["version"] is None:
            print(f"register: {r['model_name']}: {r['reason']}")
        else:
            verdict = "promoted to champion" if r["promoted"] else "kept as challenger"
            print(f"register: {r['model_name']} version {r['version']} {verdict}: {r['reason']}")
        if r.get("tflite", {}).get("int8_reason"):
            print(f"register: model_int8.tflite {r['tflite']['int8_reason']}")
    return 0


# The path flags handed to each step function under the same keyword.
_TAKES = {"out": tuple(STEP_PATHS), "prepared": ("bottleneck", "register", "review"), "oof": ("review",),
          "card": ("register",), "report": ("calibrate",),
          "bottlenecks": ("train", "evaluate", "calibrate", "register"), "metrics": ("bottleneck",),
          "evaluation": ("calibrate",), "thresholds": ("register",)}


def dataset_source(prepared) -> str:
    from mltag.data.formats import dataset_source as source

    return source(prepared)


def _image_root(prepared) -> Path | None:
    """The image folder of a prepared dataset, or None when ``prepared`` is not one."""
    from mltag.data.formats import image_root_of

    return image_root_of(prepared) if prepared and Path(prepared, "dataset.json").is_file() else None


def _show_metrics(args) -> None:
    from mltag.data.formats import read_json
    from mltag.steps.evaluate import print_table

    f = Path(args.evaluate)
    if not f.is_file():
        raise MltagError("no metrics yet; run `dvc repro` (or the evaluate step) first", f)
    ev = read_json(f, "evaluate's metrics", "evaluate")
    print_table(ev, list(ev["per_label"]))
    if Path(args.calibrate).is_file():
        ca = read_json(args.calibrate, "calibrate's metrics", "calibrate")
        at = ca["test_at_thresholds"]
        print(f"calibrated thresholds: micro F1 {ca['test_at_0.5']['micro_f1']:.3f} at 0.5 -> {at['micro_f1']:.3f}, "
              f"macro F1 {ca['test_at_0.5']['macro_f1']:.3f} -> {at['macro_f1']:.3f}")
    if Path(args.register).is_file():
        rg = read_json(args.register, "register's decision", "register")
        print(f"registry: {rg['model_name']} version {rg['version']} -> {', '.join(rg['aliases'])} ({rg['reason']})")


def _predict(args) -> int:
    from mltag.tools.predict import predict

    model = args.model
    if model is None:
        from mltag.config import load_params, model_name

        model = f"models:/{model_name(load_params(args.params))}@champion"
    fmt = "jsonl" if args.json else args.format
    if args.out:
        from mltag.files import atomic_path

        with atomic_path(args.out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
            ok, failed = predict(model, args.images, fmt, fh, args.tta, args.tracking_uri,
                                 progress=None if not args.quiet else False, explain=args.explain)
    else:
        ok, failed = predict(model, args.images, fmt, None, args.tta, args.tracking_uri,
                             progress=None if not args.quiet else False, explain=args.explain)
    if failed:
        print(f"mltag: {failed} of {ok + failed} images could not be read (their rows say why); the others are "
              "labelled", file=sys.stderr)
    return 2 if failed else 0


def _pipeline(args) -> int:
    from mltag.config import load_params
    from mltag.kubeflow import run as prun

    params = load_params(args.params)
    if args.pipeline_command == "compile" and args.batch_predict:
        out = prun.compile_batch_pipeline(args.out or prun.BATCH_COMPILED, params.pipeline.parallelism,
                                          allow_dirty=args.allow_dirty)
        print(f"pipeline: batch prediction compiled to {out}")
        return 0
    if args.pipeline_command == "compile" and args.drift:
        out = prun.compile_drift_pipeline(args.out or prun.DRIFT_COMPILED, allow_dirty=args.allow_dirty)
        print(f"pipeline: drift check compiled to {out}")
        return 0
    if args.pipeline_command == "compile":
        prun.compile_pipeline(args.out or prun.COMPILED, params, allow_dirty=args.allow_dirty)
        print(f"pipeline: compiled to {args.out or prun.COMPILED}")
        return 0
    if args.batch_predict:
        from mltag.config import model_name

        if not args.local:
            raise MltagError("--batch-predict runs with --local here; on a cluster, compile it (mltag pipeline "
                             "compile --batch-predict) and submit pipeline/batch_predict.yaml")
        if not args.images:
            raise MltagError("--batch-predict needs --images (a folder, glob or list file)")
        t0 = time.time()
        out = prun.run_batch_local(args.images, args.model or f"models:/{model_name(params)}@champion", args.shards,
                                   args.pipeline_root, args.tracking_uri)
        print(f"pipeline: batch prediction in {args.shards} shard(s) in {time.time() - t0:.0f} s: {out}")
        return 0
    bad = [a for a in args.arg if "=" not in a]
    if bad:
        raise MltagError(f"--arg expects SECTION.KEY=VALUE, got {bad[0]!r}")
    overrides = dict(a.split("=", 1) for a in args.arg)
    if args.local:
        from mltag.tracking.runs import mask_uri, tracking_uri

        print(f"pipeline: running every task on this machine (kfp.local){'' if args.verbose else '; -v shows logs'}")
        t0 = time.time()
        _, rows = prun.run_local(data=args.data, data_repo=args.data_repo, data_rev=args.data_rev,
                                 pipeline_root=args.pipeline_root, tracking_uri=args.tracking_uri, overrides=overrides,
                                 params=params, verbose=args.verbose, cache=args.cache)
        cached = sum(r[3] == "cached" for r in rows)
        print(f"pipeline: {len(rows)} tasks succeeded ({len(rows) - cached} computed, {cached} cached) in "
              f"{time.time() - t0:.0f} s; artifacts under {args.pipeline_root or 'local_outputs'}; MLflow at "
              f"{mask_uri(tracking_uri(args.tracking_uri))}")
    else:
        run = prun.submit(args.host, experiment=args.experiment, data=args.data, data_repo=args.data_repo,
                          data_rev=args.data_rev, tracking_uri=args.tracking_uri, overrides=overrides, params=params,
                          allow_dirty=args.allow_dirty)
        print(f"pipeline: submitted run {run.run_id} to {args.host} (experiment {args.experiment})")
    return 0


def on_sigterm() -> None:
    """SIGTERM (a pod stopped, ``kill``) unwinds the step like Ctrl-C: its run ends as KILLED, exit 143."""
    import signal

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process at once
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)


def entry() -> None:
    """The ``mltag`` command: ``main``, exiting through the interpreter (MLflow's and logging's exit hooks run)."""
    on_sigterm()
    sys.exit(main())


if __name__ == "__main__":  # python -m mltag.cli: the plain exit (profilers write their data after it)
    on_sigterm()
    sys.exit(main())
