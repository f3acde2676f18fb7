"""The ``mltag`` command's arguments: one subcommand per step (its paths, and every key of the params.yaml
sections it reads as ``--section.key`` and ``--key``), the tools and the project commands."""

from __future__ import annotations

import argparse

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


def resolve_params(args, step: str):
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


# What register logs into the model's run by default: the reports the steps between train and register wrote.
DEFAULT_REPORTS = ("reports/evaluate/details.json", "reports/calibrate/details.json", "reports/review/details.json")


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
        if step == "register":
            sp.add_argument("--reports", nargs="*", default=None, metavar="DETAILS_JSON",
                            help="the details.json of evaluate, calibrate and review, whose figures and files go "
                            f"into the model's MLflow run (default: those of {', '.join(DEFAULT_REPORTS)} that exist)")
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
    lin = sub.add_parser("lineage", help="a registered version followed back to its data, code, params and run")
    lin.add_argument("model", help="NAME@ALIAS (mltag-photos@champion), NAME/VERSION, or NAME (its champion)")
    lin.add_argument("--json", action="store_true", help="every field, params and metrics, as JSON")
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
    cd = sub.add_parser("code-digest", help="write each step's code digest (and a local backbone's) for dvc.yaml's "
                                            "code stage: a code change reruns the steps it changes")
    cd.add_argument("--out", default=".mltag-code", help="the folder: one file per step, and backbone "
                                                          "(default: .mltag-code)")
    bb = sub.add_parser("backbone", help="backbone tools")
    bbs = bb.add_subparsers(dest="backbone_command", required=True)
    bd = bbs.add_parser("build", help="build a built-in backbone into a SavedModel folder")
    bd.add_argument("name", help="efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2 (each also with _ms), "
                                 "or built-ins joined by + (with +colour, e.g. efficientnet_lite2_ms+colour)")
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
