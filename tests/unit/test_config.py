"""One contract per step: the typed config (mltag.config) against every view of it.

params.yaml, the CLI flags, the step functions' keywords, dvc.yaml's per-stage params,
and the Kubeflow pipeline and component parameters are generated from, or checked
against, the dataclasses; a key missing from any view fails here.
"""

from __future__ import annotations

import inspect
import json
import re

import pytest
import yaml

from conftest import REPO
from mltag.config import (
    SECTIONS,
    STEP_SECTIONS,
    Params,
    flag_names,
    load_params,
    output_keys,
    section_fields,
)
from mltag.errors import MltagError


def _keys(section: str) -> set[str]:
    return set(section_fields(section))


def test_params_yaml_holds_every_key_of_every_section_and_its_defaults():
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(data) == set(SECTIONS)
    for section in SECTIONS:
        assert set(data[section]) == _keys(section), section
    assert load_params(REPO / "params.yaml") == Params()  # the committed file holds the declared defaults


def test_step_functions_take_typed_sections_and_no_params_key_of_their_own():
    """A step function gets each section it reads as a required keyword (no default), and has no
    parameter named after a params key: every value and default comes from mltag.config."""
    from mltag.steps import step_function

    every_key = {k for s in SECTIONS for k in section_fields(s)} | set(SECTIONS)
    for step in STEP_SECTIONS:
        sig = inspect.signature(step_function(step)).parameters
        for section in STEP_SECTIONS[step]:
            assert section in sig, f"{step}() lacks its {section} section"
            param = sig[section]
            assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is inspect.Parameter.empty, \
                (step, section)
            assert param.annotation == f"config.{SECTIONS[section].__name__}", (step, section, param.annotation)
        stray = {n for n in sig if n in every_key and n not in STEP_SECTIONS[step]} | \
            {n for n in sig if n in flag_names(step) and n not in STEP_SECTIONS[step]}
        assert not stray, f"{step}() takes params key(s) {stray} outside their section"


def test_no_module_but_config_lists_the_allowed_values_of_a_key():
    """Allowed values of a choice key are declared once (a Literal in mltag.config): no other module
    spells the list out again."""
    from mltag.config import choices

    lists = {tuple(choices(s, k)) for s in SECTIONS for k in section_fields(s) if len(choices(s, k)) > 1}
    src = REPO / "src" / "mltag"
    for f in src.rglob("*.py"):
        if f.name == "config.py":
            continue
        text = f.read_text()
        for allowed in lists:
            spelled = r"[\[(]\s*" + r",\s*".join(f'"{v}"' for v in allowed) + r",?\s*[\])]"  # the whole list
            found = re.search(spelled, text)
            assert not found, f"{f.relative_to(REPO)} repeats {found.group(0)}"


def test_cli_has_a_flag_for_every_key_both_spellings():
    from mltag.cli.parser import build_parser

    parser = build_parser()
    steps = next(a for a in parser._actions if a.dest == "command").choices
    for step, sections in STEP_SECTIONS.items():
        flags = {opt: a.dest for a in steps[step]._actions for opt in a.option_strings}
        for section in sections:
            for key in _keys(section):
                assert flags.get(f"--{section}.{key}") == f"{section}.{key}", (step, section, key)
        for name in flag_names(step):
            assert "--" + name.replace("_", "-") in flags, (step, name)


def _dvc_params_mismatch(stages: dict) -> dict:
    """Per stage, what its ``params:`` list lacks and what it lists beyond its step's output-changing keys."""
    out = {}
    for step in STEP_SECTIONS:
        listed = [str(p) for p in stages[step].get("params", [])]
        want = set(output_keys(step))
        if set(listed) != want or len(listed) != len(set(listed)):
            out[step] = {"missing": sorted(want - set(listed)), "extra": sorted(set(listed) - want)}
    return out


def test_dvc_stages_list_exactly_the_output_changing_keys_key_by_key():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert _dvc_params_mismatch(stages) == {}
    # The check catches one key missing, and a whole section listed instead of its keys.
    stages["bottleneck"]["params"].remove("bottleneck.views")
    stages["evaluate"]["params"] = ["evaluate"]
    found = _dvc_params_mismatch(stages)
    assert found["bottleneck"]["missing"] == ["bottleneck.views"] and found["evaluate"]["extra"] == ["evaluate"]


def test_every_step_stage_lists_its_code_digest_and_the_code_stage_writes_them():
    """A code change reruns the stages whose code it changes: each step's stage depends on its file of the folder
    the code stage writes (bottleneck and train also on a local backbone's digest)."""
    from mltag.tools.codedigest import STEPS

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["code"]["always_changed"] and "--out .mltag-code" in stages["code"]["cmd"]
    for step in STEPS:
        listed = [d for d in stages[step]["deps"] if d.startswith(".mltag-code/")]
        assert listed == [f".mltag-code/{step}"] + ([".mltag-code/backbone"] if step in ("bottleneck", "train")
                                                    else []), step


def test_the_stages_that_read_images_in_fine_tune_mode_get_them():
    """`dvc exp run -S train.mode=fine_tune` needs no other edit: train and evaluate are given the prepared folder
    (where the images are found; the fine-tune path through that CLI is tested in test_finetune.py) and depend on
    it and on the images, so a mode switch reruns them with what they read."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for step in ("train", "evaluate"):
        assert "--prepared data/prepared" in stages[step]["cmd"], step
        assert "data/prepared" in stages[step]["deps"], step
    assert "${prepare.input}" in stages["train"]["deps"] and "train.mode" in stages["train"]["params"]


def test_a_step_code_digest_changes_with_the_code_it_runs_and_only_that(tmp_path):
    """An edit of the split code changes prepare's digest and not review's; an edit of review's module changes
    only review's; a local backbone folder replaced in place changes the backbone digest."""
    import shutil

    from mltag.tools.codedigest import PACKAGE, code_digests, code_files

    root = tmp_path / "mltag"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert root / "steps" / "prepare" / "splits.py" in code_files("prepare", root)
    assert root / "reports" / "templates" / "evaluation.html.j2" in code_files("evaluate", root)
    before = code_digests("", root)
    with open(root / "steps" / "prepare" / "splits.py", "a") as f:
        f.write("\n# a change to the split code\n")
    after = code_digests("", root)
    assert after["prepare"] != before["prepare"] and after["review"] == before["review"]
    with open(root / "steps" / "review.py", "a") as f:
        f.write("\n# a change to review\n")
    again = code_digests("", root)
    assert [s for s in again if again[s] != after[s]] == ["review"]
    backbone = tmp_path / "saved_model"
    (backbone / "variables").mkdir(parents=True)
    (backbone / "saved_model.pb").write_bytes(b"one")
    first = code_digests(str(backbone), root)["backbone"]
    (backbone / "variables" / "variables.data").write_bytes(b"new weights")
    assert code_digests(str(backbone), root)["backbone"] != first
    assert code_digests("builtin:efficientnet_lite0", root)["backbone"] == "builtin:efficientnet_lite0"
    from mltag.tools.codedigest import write_digests

    write_digests(tmp_path / "code", again)
    before = (tmp_path / "code" / "prepare").stat().st_mtime_ns
    write_digests(tmp_path / "code", again)  # unchanged: not rewritten
    assert (tmp_path / "code" / "prepare").stat().st_mtime_ns == before
    assert (tmp_path / "code" / "review").read_text() == again["review"] + "\n"


def test_outputs_record_exactly_the_output_changing_keys():
    from mltag.config import changes_output, step_config

    assert not changes_output("bottleneck", "engine") and not changes_output("bottleneck", "cache_dir")
    assert changes_output("bottleneck", "views") and changes_output("train", "learning_rate")
    for step in STEP_SECTIONS:
        recorded = step_config(step, Params())
        assert sorted(f"{s}.{k}" for s in recorded for k in recorded[s]) == sorted(output_keys(step)), step


def test_json_schema_of_params_yaml_is_committed_and_current(capsys):
    """docs/params.schema.json is what `mltag params schema` prints: editors complete and check params.yaml
    with it (params.yaml names it on its first line)."""
    from mltag.config import json_schema

    committed = json.loads((REPO / "docs" / "params.schema.json").read_text())
    assert committed == json_schema(), "run: mltag params schema > docs/params.schema.json"
    train = committed["$defs"]["Train"]
    assert train["additionalProperties"] is False
    assert train["properties"]["monitor"]["enum"] == ["val_loss", "val_map"]
    assert train["properties"]["learning_rate"]["exclusiveMinimum"] == 0
    assert (REPO / "params.yaml").read_text().startswith("# yaml-language-server: $schema=docs/params.schema.json")
    from mltag.cli import main

    assert main(["params", "schema"]) == 0  # what `mltag params schema` prints, in process
    assert json.loads(capsys.readouterr().out) == committed


def test_readme_parameter_reference_is_generated_from_the_config():
    from mltag.config import reference_markdown

    text = (REPO / "docs" / "configuration.md").read_text()
    begin, end = "<!-- params-reference:begin -->\n", "<!-- params-reference:end -->"
    assert begin in text and end in text
    assert text.split(begin)[1].split(end)[0].strip() == reference_markdown().strip(), \
        "run: make docs (mltag params reference --write docs/configuration.md)"


def test_pipeline_and_components_take_every_section_and_key(tmp_path):
    from mltag.kubeflow.pipeline import PIPELINE_SECTIONS
    from mltag.kubeflow.run import compile_pipeline

    spec, _ = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", Params(), allow_dirty=True).read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {*PIPELINE_SECTIONS, "data_repo", "data_rev", "tracking_uri"}
    for section in PIPELINE_SECTIONS:
        nullable = {k for k in section_fields(section) if getattr(SECTIONS[section](), k) is None}
        assert set(inputs[section]["defaultValue"]) == _keys(section) - nullable, section
    component_step = {"prepare": "prepare", "shard-indices": "bottleneck", "bottleneck-shard": "bottleneck",
                      "bottleneck": "bottleneck", "train": "train", "evaluate": "evaluate", "calibrate": "calibrate",
                      "register": "register", "review": "review"}
    tasks = {**spec["root"]["dag"]["tasks"]}
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    seen = set()
    for name, task in tasks.items():
        step = component_step.get(name)
        if step is None:
            continue
        seen.add(name)
        params = task["inputs"]["parameters"]
        defaults = params["defaults"]["runtimeValue"]["constant"]
        assert set(defaults) == set(STEP_SECTIONS[step]), name
        for section in STEP_SECTIONS[step]:  # every key, as compiled, not only the output-changing ones
            nullable = {k for k in section_fields(section) if getattr(SECTIONS[section](), k) is None}
            assert set(defaults[section]) == _keys(section) - nullable, (name, section)
        for section in STEP_SECTIONS[step]:
            if name == "shard-indices" and section != "bottleneck":
                continue
            assert params[section]["componentInputParameter"] in (section, f"pipelinechannel--{section}"), (name, section)
    assert seen == set(component_step)


def test_unknown_and_mistyped_keys_name_the_file_and_key(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  epoch: 3\n")
    with pytest.raises(MltagError, match=rf"{f}: unknown key train.epoch \(known: learning_rate"):
        load_params(f)
    f.write_text("train:\n  epochs: many\n")
    with pytest.raises(MltagError, match=rf"{f}: train.epochs: must be an integer, got 'many'"):
        load_params(f)
    f.write_text("bottleneck:\n  engine: gpu\n")
    with pytest.raises(MltagError, match="bottleneck.engine: must be one of auto, litert, tf, got 'gpu'"):
        load_params(f)
    f.write_text("train:\n  learning_rate: -0.1\n  dropout: 1.5\n")
    with pytest.raises(MltagError, match=r"train.learning_rate: must be > 0.*; .*train.dropout: must be < 1"):
        load_params(f)  # every bad key at once
    f.write_text("calibrate:\n  method: min_precision\n")
    with pytest.raises(MltagError, match="calibrate.method min_precision needs calibrate.min_precision"):
        load_params(f)
    f.write_text("train: 3\n")
    with pytest.raises(MltagError, match="section 'train' must be a mapping"):
        load_params(f)
    f.write_text("other_tool:\n  anything: 1\ncalibrate:\n  min_precision: 0.9\n")
    assert load_params(f).calibrate.min_precision == 0.9  # other tools' sections are left alone






def test_a_rule_across_keys_sees_every_value_given_at_once(tmp_path):
    """calibrate.method min_precision with calibrate.min_precision, given together (flags, or from Python),
    is valid whatever order they are applied in; either alone is the clear error."""
    from mltag.cli.parser import build_parser, resolve_params
    from mltag.config import sections

    assert sections("calibrate", method="min_precision", min_precision=0.9)["calibrate"].min_precision == 0.9
    with pytest.raises(MltagError, match="needs calibrate.min_precision"):
        sections("calibrate", method="min_precision")
    args = build_parser().parse_args(["calibrate", "--params", str(tmp_path / "none.yaml"), "--method", "min_precision",
                                      "--min-precision", "0.9"])
    (tmp_path / "none.yaml").write_text("{}\n")
    p = resolve_params(args, "calibrate")
    assert (p.calibrate.method, p.calibrate.min_precision) == ("min_precision", 0.9)


def test_a_gate_that_would_let_every_challenger_through_is_refused(tmp_path):
    """#51: register.margin -1 (every challenger's mAP beats the champion's by more than -1) with
    max_label_ap_drop 5 (no AP can drop by 5) switched the gate off without a word: refused, naming both keys."""
    f = tmp_path / "params.yaml"
    f.write_text("register:\n  margin: -1\n  max_label_ap_drop: 5\n")
    with pytest.raises(MltagError, match=r"register.margin: must be > -1.*register.max_label_ap_drop: must be < 1"):
        load_params(f)
    f.write_text("register:\n  margin: -0.02\n  max_label_ap_drop: 0.2\n")
    assert load_params(f).register.margin == -0.02  # a tolerance is still a gate
