"""The ``mltag`` command: one subcommand per step, plus predict, promote, backbone and pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from mltag.common import MltagError


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# (flag, params key "section.key", type, help): a flag left unset takes its params.yaml value.
STEP_FLAGS = {
    "demo-data": [("--n-images", "demo.n_images", int, "number of images"), ("--seed", "demo.seed", int, "seed")],
    "prepare": [
        ("--input", "prepare.input", str, "dataset folder or file"),
        ("--format", "prepare.format", str, "auto, lst, labels_json, image_list, folders or csv"),
        ("--val-fraction", "prepare.val_fraction", float, "validation fraction"),
        ("--test-fraction", "prepare.test_fraction", float, "test fraction"),
        ("--no-label", "prepare.no_label", str, "keep (as all-negative) or reject images without labels"),
        ("--max-bad-fraction", "prepare.max_bad_fraction", float, "fail when more images than this are bad"),
        ("--max-pixels", "prepare.max_pixels", int, "decompression-bomb cap"),
        ("--salt", "prepare.salt", str, "split hash salt (changing it reshuffles everything)"),
    ],
    "bottleneck": [
        ("--handle", "backbone.handle", str, "builtin:NAME, TF Hub URL or SavedModel folder"),
        ("--image-size", "backbone.image_size", int, "backbone input size (0: the built-in's own)"),
        ("--backbone-cache", "backbone.cache_dir", str, "where built-in backbones are built"),
        ("--cache-dir", "bottleneck.cache_dir", str, "feature cache folder"),
        ("--batch-size", "bottleneck.batch_size", int, "images per backbone batch"),
        ("--engine", "bottleneck.engine", str, "auto (LiteRT on CPU, TF on GPU), litert or tf"),
        ("--views", "bottleneck.views", int, "vectors per training image: plain + views-1 augmented"),
    ],
    "train": [
        ("--learning-rate", "train.learning_rate", float, "Adam learning rate"),
        ("--epochs", "train.epochs", int, "maximum epochs"),
        ("--batch-size", "train.batch_size", int, "batch size"),
        ("--hidden-units", "train.hidden_units", int, "hidden layer width (0: none)"),
        ("--dropout", "train.dropout", float, "dropout rate"),
        ("--patience", "train.patience", int, "early-stopping patience (epochs)"),
        ("--monitor", "train.monitor", str, "val_loss or val_map"),
        ("--seed", "train.seed", int, "random seed"),
        ("--mode", "train.mode", str, "head (cached vectors) or fine_tune (also the backbone's top blocks)"),
        ("--fine-tune-blocks", "train.fine_tune_blocks", int, "fine_tune: top backbone blocks trained"),
        ("--fine-tune-epochs", "train.fine_tune_epochs", int, "fine_tune: maximum epochs"),
        ("--fine-tune-learning-rate", "train.fine_tune_learning_rate", float, "fine_tune: backbone learning rate"),
        ("--fine-tune-patience", "train.fine_tune_patience", int, "fine_tune: early-stopping patience"),
        ("--mixed-precision", "train.mixed_precision", str, "auto (float16 on a GPU), true or false"),
        ("--backbone-cache", "backbone.cache_dir", str, "where built-in backbones are built"),
        ("--experiment", "register.experiment", str, "MLflow experiment"),
    ],
    "evaluate": [("--bootstrap", "evaluate.bootstrap", int, "bootstrap resamples for 95% CIs"),
                 ("--seed", "evaluate.seed", int, "bootstrap seed"),
                 ("--tta", "evaluate.tta", str, "none, mean or max: test-time augmentation")],
    "calibrate": [
        ("--method", "calibrate.method", str, "f1, min_precision or none (0.5 everywhere)"),
        ("--min-precision", "calibrate.min_precision", float, "precision target for method min_precision"),
        ("--min-positives", "calibrate.min_positives", int, "fewer positives -> global threshold"),
        ("--cv-folds", "calibrate.cv_folds", int, "out-of-fold head refits over train+val (0: validation only)"),
        ("--shrink", "calibrate.shrink", float, "pseudo-positives pulling a label's threshold to the global one"),
        ("--min-gain", "calibrate.min_gain", float, "out-of-fold F1 gain a label needs to leave 0.5"),
    ],
    "register": [
        ("--model-name", "register.model_name", str, "registered model name"),
        ("--experiment", "register.experiment", str, "MLflow experiment (when train opened no run)"),
        ("--margin", "register.margin", float, "mAP margin the challenger must beat the champion by"),
        ("--max-label-ap-drop", "register.max_label_ap_drop", float, "largest per-label AP drop allowed"),
        ("--tflite", "register.tflite", _bool, "also register model.tflite, model_int8.tflite and their parity"),
    ],
}

# Paths each step reads and writes (defaults match dvc.yaml).
STEP_PATHS = {
    "demo-data": [("--out", "data/demo")],
    "prepare": [("--out", "data/prepared")],
    "bottleneck": [("--prepared", "data/prepared"), ("--out", "data/bottlenecks"), ("--images", None)],
    "train": [("--bottlenecks", "data/bottlenecks"), ("--prepared", "data/prepared"), ("--out", "models/train"),
              ("--metrics", None),
              ("--history", None)],
    "evaluate": [("--model", "models/train"), ("--bottlenecks", "data/bottlenecks"), ("--prepared", "data/prepared"),
                 ("--out", "reports/evaluate"), ("--metrics", "metrics/evaluate.json"), ("--plots", None)],
    "calibrate": [("--evaluation", "reports/evaluate"), ("--model", "models/train"), ("--bottlenecks", "data/bottlenecks"),
                  ("--out", "models/thresholds.json"), ("--metrics", "metrics/calibrate.json")],
    "register": [("--model", "models/train"), ("--thresholds", "models/thresholds.json"),
                 ("--prepared", "data/prepared"), ("--out", "metrics/register.json"), ("--images", None)],
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _resolve(args, step: str) -> tuple[dict, dict]:
    from mltag.config import load_params

    params = load_params(args.params)
    for flag, key, _, _ in STEP_FLAGS.get(step, []):
        v = getattr(args, _dest(flag))
        if v is not None:
            section, name = key.split(".")
            params[section][name] = v
    values = {}
    for flag, key, _, _ in STEP_FLAGS.get(step, []):
        section, name = key.split(".")
        values[_dest(flag)] = params[section][name]
    return params, values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mltag", description="Multi-label image classification by transfer learning.")
    p.add_argument("--params", default=None, help="params file (default: ./params.yaml when present)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                         "else sqlite:///./mlflow.db)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    from mltag import __version__

    p.add_argument("--version", action="version", version=f"mltag {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for step in STEP_FLAGS:
        sp = sub.add_parser(step, help=f"run the {step} step")
        for flag, default in STEP_PATHS[step]:
            sp.add_argument(flag, default=default, help=f"path (default: {default})")
        for flag, key, typ, hlp in STEP_FLAGS[step]:
            sp.add_argument(flag, type=typ, default=None, help=f"{hlp} (params: {key})")
        if step == "prepare":
            sp.add_argument("--dataset-version", default=None, help="dataset revision to record in the report")
        if step == "bottleneck":
            sp.add_argument("--shard-index", type=int, default=0)
            sp.add_argument("--num-shards", type=int, default=1)
            sp.add_argument("--extra-cache", action="append", default=[], help="read-only feature cache (gather)")
    pr = sub.add_parser("predict", help="label images with a registered or local model")
    pr.add_argument("images", nargs="+", help="image files")
    pr.add_argument("--model", default=None,
                    help="models:/NAME@champion (default, NAME from params), runs:/..., a local model folder "
                         "or a .tflite file inside one")
    pr.add_argument("--json", action="store_true", help="print JSON lines")
    pr.add_argument("--tta", choices=["none", "mean", "max"], default="none",
                    help="test-time augmentation: combine 10 crops/mirrors by mean or max")
    ms = sub.add_parser("metrics", help="print the last run's metrics table and registry decision")
    ms.add_argument("--evaluate", default="metrics/evaluate.json")
    ms.add_argument("--calibrate", default="metrics/calibrate.json")
    ms.add_argument("--register", default="metrics/register.json")
    pm = sub.add_parser("promote", help="make VERSION the champion by hand, recording who and why")
    pm.add_argument("name")
    pm.add_argument("version")
    pm.add_argument("--reason", required=True)
    pm.add_argument("--user", default=None)
    bb = sub.add_parser("backbone", help="backbone tools")
    bbs = bb.add_subparsers(dest="backbone_command", required=True)
    bd = bbs.add_parser("build", help="build a built-in backbone into a SavedModel folder")
    bd.add_argument("name", help="efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2")
    bd.add_argument("--out", required=True)
    pl = sub.add_parser("pipeline", help="the Kubeflow pipeline")
    pls = pl.add_subparsers(dest="pipeline_command", required=True)
    pc = pls.add_parser("compile", help="write the compiled pipeline YAML")
    pc.add_argument("--out", default="pipeline/pipeline.yaml")
    pr2 = pls.add_parser("run", help="run locally (kfp.local) or submit to a KFP endpoint")
    g = pr2.add_mutually_exclusive_group(required=True)
    g.add_argument("--local", action="store_true", help="run every step on this machine with kfp.local")
    g.add_argument("--host", default=None, help="KFP endpoint URL")
    pr2.add_argument("--experiment", default="mltag")
    pr2.add_argument("--data", default="data/demo", help="dataset path/URI (or path inside --data-repo)")
    pr2.add_argument("--data-repo", default="", help="git URL of a DVC-versioned dataset")
    pr2.add_argument("--data-rev", default="", help="revision of --data-repo")
    pr2.add_argument("--pipeline-root", default=None, help="local artifact folder for --local")
    pr2.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter override")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    _setup_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    try:
        return _dispatch(args)
    except MltagError as e:
        return _user_error(str(e), args.verbose)
    except OSError as e:  # a user path: permission, read-only, disk full, not found
        where = f"{e.filename}: " if e.filename else ""
        return _user_error(f"{where}{e.strerror or e} (check the path, its permissions and free space)", args.verbose)
    except Exception as e:
        if type(e).__name__ != "MlflowException":
            raise  # a bug: the traceback matters
        from mltag.tracking import tracking_uri

        return _user_error(f"MLflow at {tracking_uri(args.tracking_uri)}: {str(e).splitlines()[0][:300]}",
                           args.verbose)
    except KeyboardInterrupt:
        print("mltag: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


def _user_error(message: str, verbose: bool) -> int:
    """One line on stderr and exit status 2; ``-v`` adds the traceback."""
    if verbose:
        import traceback

        traceback.print_exc()
    print(f"mltag: error: {message}", file=sys.stderr)
    return 2


def _setup_logging(level: int) -> None:
    """mltag's own messages go to stderr as plain lines; other libraries keep their defaults."""
    logger = logging.getLogger("mltag")
    if not any(getattr(h, "_mltag", False) for h in logger.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        h._mltag = True
        logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = False


def _dispatch(args) -> int:
    cmd = args.command
    if cmd in ("train", "evaluate", "register", "backbone") and not args.verbose:
        # TF's C++ logs a few startup lines (oneDNN, "could not find cuda drivers") before any
        # Python-side setting applies; -v shows them.
        from mltag.common import quiet_stderr

        with quiet_stderr():
            import tensorflow

            # Device discovery logs "failed call to cuInit" on machines without CUDA; do it now, quietly.
            tensorflow.config.list_physical_devices("GPU")
    progress = not args.quiet
    if cmd in STEP_FLAGS:
        params, v = _resolve(args, cmd)
    if cmd == "demo-data":
        from mltag.demo import make_demo_data

        make_demo_data(args.out, v["n_images"], v["seed"])
        print(f"demo-data: {v['n_images']} images in {args.out}")
    elif cmd == "prepare":
        from mltag.fetch import git_rev
        from mltag.prepare import prepare

        r = prepare(v["input"], args.out, v["format"], v["val_fraction"], v["test_fraction"], v["no_label"],
                    v["max_bad_fraction"], v["max_pixels"], v["salt"], args.dataset_version or git_rev(v["input"]),
                    progress)
        print(f"prepare: {r['images_used']} images ({r['format']}): {r['images_per_split']}; "
              f"{len(r['rejected'])} rejected; report in {args.out}/report.html")
    elif cmd == "bottleneck":
        from mltag.bottleneck import bottleneck

        bottleneck(args.prepared, args.out, v["handle"], v["cache_dir"], v["backbone_cache"], v["image_size"],
                   v["batch_size"], args.images, args.shard_index, args.num_shards, args.extra_cache, progress,
                   engine=v["engine"], views=v["views"])
    elif cmd == "train":
        from mltag.train import train

        s = train(args.bottlenecks, args.out, v["learning_rate"], v["epochs"], v["batch_size"], v["hidden_units"],
                  v["dropout"], v["patience"], v["monitor"], v["seed"], v["backbone_cache"], args.tracking_uri,
                  v["experiment"], config=params, progress=progress, metrics_file=args.metrics,
                  history_file=args.history, mode=v["mode"], images=_image_root(args.prepared),
                  fine_tune_blocks=v["fine_tune_blocks"], fine_tune_epochs=v["fine_tune_epochs"],
                  fine_tune_learning_rate=v["fine_tune_learning_rate"], fine_tune_patience=v["fine_tune_patience"],
                  mixed_precision=str(v["mixed_precision"]).lower())
        ft = (f"; fine-tune best epoch {s['fine_tune_best_epoch']}/{s['fine_tune_epochs_run']}, val loss "
              f"{s['fine_tune_val_loss']:.4f}" if s.get("fine_tune_val_loss") is not None else "")
        val = f"{s['val_loss']:.4f}" if s["val_loss"] is not None else "n/a"
        print(f"train: head best epoch {s['best_epoch']}/{s['epochs_run']}, val loss {val}{ft}, "
              f"MLflow run {s['run_id']}")
    elif cmd == "evaluate":
        from mltag.evaluate import evaluate

        images = _image_root(args.prepared)
        evaluate(args.model, args.bottlenecks, args.out, args.metrics, images, v["bootstrap"], v["seed"],
                 args.tracking_uri, args.plots, tta=v["tta"])
    elif cmd == "calibrate":
        from mltag.calibrate import calibrate

        calibrate(args.evaluation, args.model, args.out, args.metrics, v["method"], v["min_precision"],
                  v["min_positives"], args.tracking_uri, bottlenecks=args.bottlenecks, cv_folds=v["cv_folds"],
                  shrink=v["shrink"], min_gain=v["min_gain"], progress=progress)
    elif cmd == "register":
        from mltag.register import register

        register(args.model, args.thresholds, args.prepared, args.out, v["model_name"], v["margin"],
                 v["max_label_ap_drop"], args.images, args.tracking_uri, v["experiment"], tflite=v["tflite"])
    elif cmd == "predict":
        return _predict(args)
    elif cmd == "metrics":
        _show_metrics(args)
    elif cmd == "promote":
        from mltag.register import promote

        promote(args.name, args.version, args.reason, args.user, args.tracking_uri)
    elif cmd == "backbone":
        from mltag.backbone import build_builtin

        out = build_builtin(args.name, args.out)
        print(f"backbone: {args.name} written to {out}")
    elif cmd == "pipeline":
        return _pipeline(args)
    return 0


def _image_root(prepared) -> Path | None:
    """The image folder of a prepared dataset, or None when ``prepared`` is not one."""
    from mltag.prepare import image_root_of

    return image_root_of(prepared) if prepared and Path(prepared, "dataset.json").is_file() else None


def _show_metrics(args) -> None:
    from mltag.evaluate import print_table

    f = Path(args.evaluate)
    if not f.is_file():
        raise MltagError("no metrics yet; run `dvc repro` (or the evaluate step) first", f)
    ev = json.loads(f.read_text(encoding="utf-8"))
    print_table(ev, list(ev["per_label"]))
    if Path(args.calibrate).is_file():
        ca = json.loads(Path(args.calibrate).read_text(encoding="utf-8"))
        at = ca["test_at_thresholds"]
        print(f"calibrated thresholds: micro F1 {ca['test_at_0.5']['micro_f1']:.3f} at 0.5 -> {at['micro_f1']:.3f}, "
              f"macro F1 {ca['test_at_0.5']['macro_f1']:.3f} -> {at['macro_f1']:.3f}")
    if Path(args.register).is_file():
        rg = json.loads(Path(args.register).read_text(encoding="utf-8"))
        print(f"registry: {rg['model_name']} version {rg['version']} -> {', '.join(rg['aliases'])} ({rg['reason']})")


def _predict(args) -> int:
    from mltag.common import MltagError as Err
    from mltag.images import BadImage, check_image

    bad = []
    for img in args.images:
        try:
            check_image(img)
        except BadImage as e:
            bad.append(img)
            print(f"mltag: error: {img}: {e}", file=sys.stderr)
    args.images = [img for img in args.images if img not in bad]
    if not args.images:
        return 2
    model = args.model
    if model is None:
        from mltag.config import load_params

        model = f"models:/{load_params(args.params)['register']['model_name']}@champion"
    local = Path(model)
    if (local.is_dir() and (local / "model.json").is_file()) or (local.suffix == ".tflite" and local.is_file()):
        from mltag.model import InferenceModel

        folder = local.parent if local.suffix == ".tflite" else local
        thresholds = None
        t = folder.parent / "thresholds.json"
        if t.is_file() and not (folder / "thresholds.json").is_file():
            thresholds = json.loads(t.read_text(encoding="utf-8"))
        try:
            results = InferenceModel(model, thresholds).predict(args.images, tta=args.tta)
        except BadImage as e:
            raise Err(str(e)) from None
    else:
        import base64

        import mlflow
        import pandas as pd

        from mltag import tracking

        tracking.setup(args.tracking_uri)
        try:
            pm = mlflow.pyfunc.load_model(model)
        except Exception as e:  # noqa: BLE001
            raise Err(f"cannot load model {model}: {str(e).splitlines()[0][:300]}") from None
        df = pd.DataFrame({"image": [base64.b64encode(Path(p).read_bytes()).decode() for p in args.images]})
        try:
            res = pm.predict(df, params={"tta": args.tta})
        except Exception as e:  # noqa: BLE001
            raise Err(f"prediction failed: {str(e).splitlines()[0][:300]}") from None
        results = []
        for _, row in res.iterrows():
            scores = {c[len("score_"):]: float(row[c]) for c in res.columns if c.startswith("score_")}
            results.append({"labels": [x for x in str(row["labels"]).split(",") if x], "scores": scores})
    for path, r in zip(args.images, results):
        if args.json:
            print(json.dumps({"image": path, **r}))
        else:
            lab = ", ".join(f"{lb} ({r['scores'][lb]:.2f})" for lb in r["labels"]) or "(no label)"
            print(f"{path}: {lab}")
    if bad:
        print(f"mltag: {len(bad)} of {len(bad) + len(args.images)} images could not be read (named above); "
              "the others are labelled", file=sys.stderr)
    return 2 if bad else 0


def _pipeline(args) -> int:
    from pipeline import run as prun

    if args.pipeline_command == "compile":
        prun.compile_pipeline(args.out)
        print(f"pipeline: compiled to {args.out}")
        return 0
    overrides = dict(a.split("=", 1) for a in args.arg)
    if args.local:
        prun.run_local(data=args.data, data_repo=args.data_repo, data_rev=args.data_rev,
                       pipeline_root=args.pipeline_root, tracking_uri=args.tracking_uri, overrides=overrides)
    else:
        prun.submit(args.host, experiment=args.experiment, data=args.data, data_repo=args.data_repo,
                    data_rev=args.data_rev, tracking_uri=args.tracking_uri, overrides=overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
