"""A dataset's registered model name: the demo and your photos never share a model by default."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("source, name", [
    ("data/demo", "mltag-demo"),
    ("/abs/path/data/demo/", "mltag-demo"),
    ("datasets/photos/labels.csv", "mltag-photos"),
    ("datasets/My Photos 2024/all.lst", "mltag-my-photos-2024"),
    ("gs://bucket/teams/Street-Scenes", "mltag-street-scenes"),
    ("file:///mnt/shared/flowers", "mltag-flowers"),
    ("datasets/photos.v2", "mltag-photos-v2"),
    ("", "mltag-data"),
])
def test_a_dataset_names_its_model_after_its_folder(source, name):
    from mltag.config import derived_model_name

    assert derived_model_name(source) == name


def test_an_explicit_model_name_wins_and_predict_uses_the_same_name_as_register():
    from mltag.config import Params, model_name, params_from_dict

    assert model_name(Params()) == "mltag-demo"  # the defaults: the demo folder
    p = params_from_dict({"prepare": {"input": "datasets/photos/labels.csv"}}, "params.yaml")
    assert model_name(p) == "mltag-photos"
    p = params_from_dict({"prepare": {"input": "datasets/photos"}, "register": {"model_name": "street"}}, "params.yaml")
    assert model_name(p) == "street"
