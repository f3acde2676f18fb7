"""The ``mltag`` command: one subcommand per step, plus predict, promote, backbone and pipeline."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

from mltag.cli.parser import STEP_PATHS, build_parser, resolve_params
from mltag.errors import MltagError, Terminated
from mltag.logs import setup_logging


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
    with _stderr_without_credentials(getattr(args, "tracking_uri", None)):
        setup_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
        return _main(args, t0, cpu0)


def _main(args, t0: float, cpu0: float) -> int:
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
        _record_timing(args, t0, cpu0)


class _Scrubbing:
    """A text stream that writes what it is given with a tracking URI's credentials replaced by ``***``."""

    def __init__(self, stream, uri: str):
        self._stream, self._uri = stream, uri

    def write(self, text: str) -> int:
        from mltag.tracking.runs import scrub

        self._stream.write(scrub(text, self._uri))
        return len(text)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding...: the stream's own
        return getattr(self._stream, name)


@contextlib.contextmanager
def _stderr_without_credentials(explicit_uri: str | None):
    """While the command runs, stderr never shows the tracking URI's user name, password or token: not in mltag's
    lines, and not in what libraries log or put in their exceptions (``-v`` prints tracebacks and MLflow's own
    debug lines). Only where the URI holds a credential; every other run writes straight through."""
    from mltag.tracking.runs import mask_uri, tracking_uri

    uri = tracking_uri(explicit_uri)
    if mask_uri(uri) == uri:  # nothing that masking would drop
        yield
        return
    original = sys.stderr
    sys.stderr = _Scrubbing(original, uri)
    try:
        yield
    except Exception:  # noqa: BLE001 - a bug keeps its traceback and exit 1, as Python prints it, but scrubbed
        import traceback

        traceback.print_exc()
        raise SystemExit(1) from None
    finally:
        sys.stderr = original


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
    """The larger of this process's own peak (VmHWM) and its largest child's (a TF conversion, say)."""
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
    if not path:
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
    if cmd in STEP_PATHS:
        return _run_step(cmd, args, not args.quiet)
    handler = {"predict": _predict, "drift": _drift, "suggest": _suggest, "metrics": _show_metrics, "lineage": _lineage,
               "promote": _promote, "doctor": _doctor, "backbone": _backbone, "params": _params,
               "pipeline": _pipeline, "code-digest": _code_digest}[cmd]
    return handler(args) or 0


def _lineage(args) -> None:
    import json

    from mltag.tools.lineage import lineage, render

    r = lineage(args.model, args.tracking_uri)
    print(json.dumps(r, indent=2) if args.json else render(r))


def _drift(args) -> int:
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
    u = r["unlike_training"]
    size = (f"{u['share']:.0%} of the {r['images']} new images look unlike the training images (of held-out test "
            f"images, {u['expected']:.0%} do); " if u["share"] is not None else "")
    model = r["model"].removeprefix("models:/")
    print(f"drift: {'FOUND' if r['drift'] else 'none found'} for {model}: {size}vectors MMD p={v['p_value']:.4f} "
          f"(domain AUC {v['auc']:.3f}); labels shifted: {', '.join(shifted) or 'none'}; report in "
          f"{args.out}/drift.html")
    return 3 if r["drift"] else 0


def _suggest(args) -> None:
    from mltag.config import load_params, model_name
    from mltag.tools.suggest import suggest

    params = load_params(args.params)
    r = suggest(args.model or f"models:/{model_name(params)}@champion", args.images, args.n, args.out,
                store=params.bottleneck.cache_dir, backbone_cache_dir=params.backbone.cache_dir,
                engine=params.bottleneck.engine, tracking_uri=args.tracking_uri, progress=not args.quiet)
    print(f"suggest: the {r['suggested']} of {r['images']} images most worth labelling are in {args.out} "
          f"({r['computed']} vectors computed); label them in {r['page']}"
          + (f"; {len(r['unreadable'])} unreadable image(s) left out" if r["unreadable"] else ""))


def _promote(args) -> None:
    from mltag.registry.versions import promote

    print(json.dumps(promote(args.name, args.version, args.reason, args.user, args.tracking_uri)))


def _doctor(args) -> int:
    from mltag.config import Params, load_params
    from mltag.tools.doctor import doctor

    try:
        params, problem = load_params(args.params), None
    except MltagError as e:
        params, problem = Params(), str(e)
    return doctor(params, args.tracking_uri, measure=not args.no_measure, params_problem=problem)


def _backbone(args) -> None:
    from mltag.backbones.builtin import build_builtin

    if args.out is not None:
        out = build_builtin(args.name, args.out)
        print(f"backbone: {args.name} written to {out}")
        return
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


def _code_digest(args) -> None:
    from mltag.config import load_params
    from mltag.tools.codedigest import code_digests, write_digests

    write_digests(args.out, code_digests(load_params(args.params).backbone.handle))


def _params(args) -> None:
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


def _run_step(step: str, args, progress: bool) -> int:
    """One step through the same entry as the Kubeflow components (``mltag.steps.run_step``)."""
    from mltag.steps import run_step

    params = resolve_params(args, step)
    rt = {k: getattr(args, k) for k in _TAKES if step in _TAKES[k]}
    if step in ("train", "evaluate", "calibrate", "register", "review"):
        rt["metrics_file"] = args.metrics
    if step in ("train", "register"):  # the steps between them open no MLflow store
        rt["tracking_uri"] = args.tracking_uri
    if step in ("prepare", "bottleneck", "train", "calibrate", "review"):
        rt["progress"] = progress
    if step == "demo-data":
        out = run_step(step, params, **rt)
        print(f"demo-data: {params.demo.n_images} images in {out}")
    elif step == "prepare":
        from mltag.data.fetch import dataset_version_of

        rt["dataset_version"] = args.dataset_version or dataset_version_of(params.prepare.input)
        r = run_step(step, params, **rt)
        print(f"prepare: {r['images_used']} images ({r['format']}): {r['images_per_split']}; "
              f"{len(r['rejected'])} rejected{_data_notes(r, params)}; report in {args.out}/report.html")
    elif step == "bottleneck":
        rt.update(images=args.images, extra_caches=args.extra_cache, shard_index=args.shard_index or 0)
        if args.shard_index is None:  # bottleneck.num_shards is the Kubeflow fan-out; locally one run does it all
            params = params.replace("bottleneck", num_shards=1)
        run_step(step, params, **rt)
    elif step == "train":
        root = _image_root(args.prepared)
        from mltag.data.formats import dataset_version, label_groups_of

        s = run_step(step, params, **rt, history_file=args.history, images=root,
                     dataset=dataset_source(args.prepared) if root else None,
                     dataset_version=dataset_version(args.prepared) if root else None,
                     exclusive_groups=label_groups_of(args.prepared))
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
        from mltag.cli.parser import DEFAULT_REPORTS

        reports = args.reports if args.reports is not None else [f for f in DEFAULT_REPORTS if Path(f).is_file()]
        r = run_step(step, params, **rt, model_dir=args.model, images=args.images, reports=reports)
        if r["version"] is None:
            print(f"register: {r['model_name']}: {r['reason']}")
        else:
            verdict = "promoted to champion" if r["promoted"] else "kept as challenger"
            print(f"register: {r['model_name']} version {r['version']} {verdict}: {r['reason']}")
        if r.get("tflite", {}).get("int8_reason"):
            print(f"register: model_int8.tflite {r['tflite']['int8_reason']}")
    return 0


def _data_notes(r: dict, params) -> str:
    """What prepare's report knows that a person should read now: duplicates (conflicting ones named), the image
    sizes, and a warning when most images are far below the backbone's input (they are upscaled)."""
    from mltag.backbones.builtin import default_image_size

    notes = []
    dups, conflicting = r.get("exact_duplicates") or [], r.get("conflicting_duplicates") or []
    if dups:
        notes.append(f"{len(dups)} group(s) of identical images under other names")
    if conflicting:
        first = conflicting[0]
        notes.append(f"{len(conflicting)} with conflicting labels, e.g. {first['paths'][0]} "
                     f"({' '.join(first['labels'][0]) or 'no label'}) = {first['paths'][1]} "
                     f"({' '.join(first['labels'][1]) or 'no label'}): fix one or drop it")
    groups = r.get("label_groups") or []
    if groups:
        from mltag.data.groups import describe

        notes.append(f"exclusive label group(s), one label of each per image: {describe(groups)}")
    side = r.get("image_short_side")
    if side:
        notes.append(f"short side {side['min']}-{side['max']} px (median {side['median']})")
        size = params.backbone.image_size or default_image_size(params.backbone.handle)
        if side["median"] * 2 <= size:
            notes.append(f"WARNING: most images are under half the backbone's {size} px input and will be upscaled "
                         "(a smaller backbone, or larger photos, may serve them better)")
    return "".join(f"; {n}" for n in notes)


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
    from mltag.data.handoff import read_json
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
    _stops_survive_finalizers()


def _stops_survive_finalizers() -> None:
    """Python drops an exception raised inside a finalizer or a weakref callback (it prints "Exception ignored in"),
    so a SIGTERM or Ctrl-C whose handler ran there was lost and the step ran on (a train sent SIGTERM kept training).
    Such a stop is raised again 50 ms later, through SIGALRM, in whatever code runs then (and again, should that be
    another finalizer)."""
    import signal

    previous = sys.unraisablehook
    lost: list[BaseException] = []

    def again(signum, frame):
        if lost:
            raise lost.pop()

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, (Terminated, KeyboardInterrupt)):
            previous(unraisable)
            return
        lost[:] = [type(unraisable.exc_value)()]
        signal.signal(signal.SIGALRM, again)
        signal.setitimer(signal.ITIMER_REAL, 0.05)

    sys.unraisablehook = hook


def entry() -> None:
    """The ``mltag`` command: ``main``, exiting through the interpreter (MLflow's and logging's exit hooks run)."""
    on_sigterm()
    sys.exit(main())

