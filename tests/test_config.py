"""One contract per step: the typed config (mltag.config) against every view of it.

params.yaml, the CLI flags, the step functions' keywords, dvc.yaml's per-stage params,
and the Kubeflow pipeline and component parameters are generated from, or checked
against, the dataclasses; a key missing from any view fails here.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from mltag.common import MltagError
from mltag.config import (
    SECTIONS,
    STEP_SECTIONS,
    Params,
    load_params,
    section_fields,
    step_kwargs,
)


def _keys(section: str) -> set[str]:
    return {f.name for f in section_fields(section)}


def test_params_yaml_holds_every_key_of_every_section_and_its_defaults():
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(data) == set(SECTIONS)
    for section in SECTIONS:
        assert set(data[section]) == _keys(section), section
    assert load_params(REPO / "params.yaml") == Params()  # the committed file holds the declared defaults


def test_every_step_function_takes_every_key_it_reads_by_keyword():
    from mltag.steps import step_function

    for step in STEP_SECTIONS:
        sig = inspect.signature(step_function(step)).parameters
        missing = [k for k in step_kwargs(step, Params()) if k not in sig]
        assert not missing, f"{step}() lacks {missing}"
        kinds = {sig[k].kind for k in step_kwargs(step, Params())}
        assert inspect.Parameter.POSITIONAL_ONLY not in kinds


def test_cli_has_a_flag_for_every_key_both_spellings():
    from mltag.cli import build_parser

    parser = build_parser()
    steps = next(a for a in parser._actions if a.dest == "command").choices
    for step, sections in STEP_SECTIONS.items():
        flags = {opt: a.dest for a in steps[step]._actions for opt in a.option_strings}
        for section in sections:
            for key in _keys(section):
                assert flags.get(f"--{section}.{key}") == f"{section}.{key}", (step, section, key)
        for name in step_kwargs(step, Params()):
            assert "--" + name.replace("_", "-") in flags, (step, name)


def test_dvc_stages_depend_on_every_section_their_step_reads():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for step, sections in STEP_SECTIONS.items():
        listed = {str(p).split(".")[0] for p in stages[step].get("params", [])}
        assert set(sections) <= listed, (step, set(sections) - listed)


def test_pipeline_and_components_take_every_section_and_key(tmp_path):
    from mltag.kubeflow.pipeline import PIPELINE_SECTIONS
    from mltag.kubeflow.run import compile_pipeline

    spec, _ = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", Params(), allow_dirty=True).read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {*PIPELINE_SECTIONS, "data_repo", "data_rev", "tracking_uri"}
    for section in PIPELINE_SECTIONS:
        nullable = {f.name for f in section_fields(section) if getattr(SECTIONS[section](), f.name) is None}
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
    with pytest.raises(MltagError, match="train.epochs must be an integer, got 'many'"):
        load_params(f)
    f.write_text("bottleneck:\n  engine: gpu\n")
    with pytest.raises(MltagError, match="bottleneck.engine must be one of auto, litert, tf"):
        load_params(f)
    f.write_text("other_tool:\n  anything: 1\ncalibrate:\n  min_precision: 0.9\n")
    assert load_params(f).calibrate.min_precision == 0.9  # other tools' sections are left alone


def test_flags_override_params_and_the_resolved_config_is_saved_with_the_output(tmp_path, colour_dataset):
    (tmp_path / "params.yaml").write_text(f"prepare:\n  input: {colour_dataset}\n  salt: from-file\n")
    run_cli("prepare", "--out", str(tmp_path / "p"), "--val-fraction", "0.2", "--prepare.test_fraction", "0.25",
            cwd=tmp_path)
    saved = json.loads((tmp_path / "p" / "dataset.json").read_text())["config"]["prepare"]
    assert (saved["val_fraction"], saved["test_fraction"], saved["salt"]) == (0.2, 0.25, "from-file")
    p = run_cli("prepare", "--out", str(tmp_path / "q"), "--val-fraction", "lots", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "prepare.val_fraction must be a number" in p.stderr


@pytest.mark.slow
def test_wheel_installs_without_generic_packages_and_compiles_from_anywhere(tmp_path):
    """pip install . ships mltag only, and `mltag pipeline compile --params` needs no checkout."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(wheels.glob("mltag-*.whl"))
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"mltag"}
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (tmp_path / "my-params.yaml").write_text("train:\n  epochs: 7\nbottleneck:\n  num_shards: 3\n")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    code = ("import sys, mltag; assert mltag.__file__.startswith(sys.argv[1]), mltag.__file__;"
            "from mltag.cli import main; sys.exit(main(sys.argv[2:]))")
    p = subprocess.run([sys.executable, "-c", code, str(target), "pipeline", "compile", "--params",
                        str(tmp_path / "my-params.yaml"), "--out", "compiled.yaml"], cwd=work, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    spec, _ = yaml.safe_load_all((work / "compiled.yaml").read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["train"]["defaultValue"]["epochs"] == 7 and inputs["bottleneck"]["defaultValue"]["num_shards"] == 3
    assert not (target / "pipeline").exists() and not (target / "components").exists()
    assert Path(work / "compiled.yaml").is_file()
