"""Exclusive label groups (#53): found in the labels, and predicted as the top-scoring label of each."""

from __future__ import annotations

import numpy as np
import pytest

from mltag import metrics as M
from mltag.data.groups import find_groups


def _colour_item(n: int, seed: int = 0):
    """colour (4) + item (3), each image exactly one of each, plus a free label 'sale' on about a third."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 8), np.float32)
    y[np.arange(n), rng.integers(0, 4, n)] = 1
    y[np.arange(n), 4 + rng.integers(0, 3, n)] = 1
    y[:, 7] = rng.random(n) < 0.33
    return y


def test_colour_and_item_are_two_groups_and_a_free_label_is_in_none():
    y = _colour_item(300)
    assert find_groups(y) == [[0, 1, 2, 3], [4, 5, 6]] or find_groups(y) == [[4, 5, 6], [0, 1, 2, 3]]
    # single-label data is one group; a rare label (under min_positives) is left out of the search
    single = np.eye(3, dtype=np.float32)[np.random.default_rng(1).integers(0, 3, 90)]
    assert find_groups(single) == [[0, 1, 2]]
    rare = np.concatenate([single, np.zeros((90, 1), np.float32)], axis=1)
    rare[:2, 3], rare[:2, :3] = 1, 0
    assert find_groups(rare) == []  # two images have none of the frequent three: no exact cover


def test_multi_label_data_without_groups_behaves_as_before():
    rng = np.random.default_rng(2)
    y = (rng.random((400, 5)) < 0.4).astype(np.float32)  # labels that co-occur freely
    assert find_groups(y) == []
    s = rng.random((400, 5))
    t, ml, groups = M.decision_rule({"thresholds": {str(i): 0.4 for i in range(5)}}, [str(i) for i in range(5)])
    assert groups == [] and (M.decide(s, t, ml, groups) == (s >= 0.4)).all()


def test_a_group_predicts_its_top_scoring_label_whatever_the_thresholds():
    labels = ["red", "blue", "green", "shoe", "bag", "sale"]
    th = {"thresholds": dict.fromkeys(labels, 0.5), "groups": [["red", "blue", "green"], ["shoe", "bag"]]}
    t, ml, groups = M.decision_rule(th, labels)
    assert groups == [[0, 1, 2], [3, 4]]
    s = np.array([[0.2, 0.3, 0.1, 0.9, 0.8, 0.7],    # no colour at 0.5: blue anyway; two items: shoe only
                  [0.6, 0.7, 0.1, 0.1, 0.2, 0.1]])   # two colours at 0.5: blue only; bag (0.2) anyway
    assert M.decide(s, t, ml, groups).astype(int).tolist() == [[0, 1, 0, 1, 0, 1], [0, 1, 0, 0, 1, 0]]
    y = np.array([[0, 1, 0, 1, 0, 1], [1, 0, 0, 0, 1, 0]])
    assert M.compute(y, s, t, labels, ml, groups)["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))


def test_a_damaged_group_list_is_refused(tmp_path):
    import json

    from mltag.data.formats import read_thresholds
    from mltag.errors import MltagError

    f = tmp_path / "thresholds.json"
    for groups, match in (([["red"]], "two or more"), ([["red", "blue"], ["blue", "bag"]], "in two exclusive"),
                          ([["red", "pink"]], "does not score: pink")):
        f.write_text(json.dumps({"thresholds": {"red": 0.5, "blue": 0.5, "bag": 0.5}, "groups": groups}))
        with pytest.raises(MltagError, match=match):
            read_thresholds(f, ["red", "blue", "bag"])
