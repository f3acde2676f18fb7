"""Settings and hand-made files that would be silently ignored or half-used are refused, naming the fix."""

from __future__ import annotations

import pytest

from mltag.errors import MltagError


def test_a_misspelled_section_is_refused_and_another_tools_section_is_left_alone():
    from mltag.config import params_from_dict

    with pytest.raises(MltagError, match="unknown section 'trian' \\(did you mean 'train'\\?\\)"):
        params_from_dict({"trian": {"epochs": 3}}, "params.yaml")
    assert params_from_dict({"my_tool": {"x": 1}, "train": {"epochs": 3}}, "params.yaml").train.epochs == 3


@pytest.mark.parametrize("section, values, message", [
    ("train", {"learning_rate": float("inf")}, "train.learning_rate: must be a finite number"),
    ("train", {"learning_rate": float("nan")}, "train.learning_rate: must be a finite number"),
    ("prepare", {"val_fraction": 0.6, "test_fraction": 0.6}, "must leave at least 10% of the images to train on"),
])
def test_infinite_rates_and_fractions_that_leave_nothing_to_train_on_are_refused(section, values, message):
    from mltag.config import params_from_dict

    with pytest.raises(MltagError, match=message):
        params_from_dict({section: values}, "params.yaml")


def test_a_pipeline_is_compiled_only_to_a_yaml_name(tmp_path):
    from mltag.kubeflow.run import compile_pipeline

    with pytest.raises(MltagError, match="a compiled pipeline is a YAML file"):
        compile_pipeline(tmp_path, allow_dirty=True)
    with pytest.raises(MltagError, match="a compiled pipeline is a YAML file"):
        compile_pipeline(tmp_path / "pipeline.json", allow_dirty=True)


def test_a_csv_image_path_with_a_tab_or_line_break_is_refused_with_its_line(tmp_path):
    from mltag.data.datasets import read_dataset

    (tmp_path / "labels.csv").write_text('path,labels\na.jpg,sea\n"b\tc.jpg",sea\n')
    with pytest.raises(MltagError, match="labels.csv:3: image path 'b\\\\tc.jpg' holds a tab or a line break"):
        read_dataset(tmp_path / "labels.csv", "csv")


@pytest.mark.parametrize("rows, message", [
    (["images/a.jpg,sea,1,1,0.5,0.9"], ":2: the row changes nothing"),
    (["images/a.jpg,sea,1,0,0.5,0.9", "images/a.jpg,sea,1,0,0.5,0.9"], ":3: images/a.jpg sea is listed twice \\(first on line 2\\)"),
    ([], "no accepted rows"),
])
def test_accepted_rows_that_change_nothing_or_repeat_are_refused(tmp_path, rows, message):
    from mltag.steps.review import read_accepted

    f = tmp_path / "accepted.csv"
    f.write_text("path,label,given,suggested,score,confidence\n" + "".join(r + "\n" for r in rows))
    with pytest.raises(MltagError, match=message):
        read_accepted(f)


@pytest.mark.parametrize("edit, message", [
    ({"image_size": 100000}, "'image_size' must be an integer from 16 to 2048, got 100000"),
    ({"image_size": "224"}, "'image_size' must be an integer from 16 to 2048"),
])
def test_a_model_json_size_is_bounded(tmp_path, edit, message):
    import json

    from mltag.data.formats import read_model_meta

    (tmp_path / "model.json").write_text(json.dumps({"format": 2, "labels": ["a", "b"], "image_size": 224, **edit}))
    with pytest.raises(MltagError, match=message):
        read_model_meta(tmp_path, verify=False)


@pytest.mark.parametrize("edit, message", [
    ({"views": None}, "views: None"), ({"feature_dim": "x"}, "feature_dim: 'x'"), ({"image_size": 0}, "image_size: 0"),
])
def test_a_damaged_bottleneck_json_is_a_clear_error(tmp_path, edit, message):
    import json

    from mltag.data.formats import read_bottleneck_meta

    meta = {"format": 2, "backbone_handle": "h", "backbone_id": "i", "image_size": 224, "preprocessing": "p",
            "views": 1, "feature_dim": 1280, **edit}
    (tmp_path / "bottleneck.json").write_text(json.dumps(meta))
    with pytest.raises(MltagError, match=f"bottleneck.json is damaged \\({message}\\)"):
        read_bottleneck_meta(tmp_path)


def test_a_cut_or_mixed_bottleneck_file_and_a_damaged_dataset_json_read_as_damage(tmp_path):
    """Fault cases 11 and 12: train.npz's vectors cut to 100 columns, or its label columns not those of labels.txt,
    and dataset.json's labels not a list: the damaged-file message naming the file, not a traceback later."""
    import json

    import numpy as np

    from mltag.data.formats import image_root_of, load_split, write_split
    from mltag.errors import MltagError

    bn = tmp_path / "bn"
    bn.mkdir()
    (bn / "labels.txt").write_text("a\nb\nc\n")
    (bn / "bottleneck.json").write_text(json.dumps({"format": 2, "feature_dim": 1280}))
    write_split(bn, "train", np.zeros((4, 100), np.float16), np.zeros((4, 3), np.uint8), ["x.jpg"] * 4, None)
    with pytest.raises(MltagError, match=r"train.npz.*damaged \(vectors of 100 values, but bottleneck.json says 1280\)"):
        load_split(bn, "train")
    write_split(bn, "train", np.zeros((4, 1280), np.float16), np.zeros((4, 2), np.uint8), ["x.jpg"] * 4, None)
    with pytest.raises(MltagError, match=r"damaged \(2 label columns, but labels.txt names 3\)"):
        load_split(bn, "train")
    write_split(bn, "train", np.zeros((4, 1280), np.float16), np.zeros((4, 3), np.uint8), ["x.jpg"] * 4, None)
    assert load_split(bn, "train")[0].shape == (4, 1280)

    prep = tmp_path / "prepared"
    prep.mkdir()
    (prep / "dataset.json").write_text(json.dumps({"format": 1, "image_root": "..", "labels": "abc"}))
    with pytest.raises(MltagError, match=r"dataset.json.*damaged \(labels: 'abc', not a list of names\)"):
        image_root_of(prep)
