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


def test_review_suggests_a_swap_within_a_group_and_applying_it_keeps_the_group_whole(tmp_path):
    """#53: 'remove black' (1.00) and 'add brown' (0.98) for one photo are one suggestion, black -> brown; an addition
    or removal alone inside a group is not suggested (it would leave two colours, or none)."""
    from mltag.steps.review import _group_swaps, apply_review

    names, paths = ["black", "brown", "white", "shoe", "bag"], ["a.jpg", "b.jpg", "c.jpg"]
    y = np.array([[1, 0, 0, 1, 0], [0, 0, 1, 0, 1], [1, 0, 0, 0, 1]])
    s = np.array([[0.01, 0.98, 0.01, 0.9, 0.1],    # a: given black, brown scores highest -> swap
                  [0.10, 0.10, 0.80, 0.2, 0.9],    # b: right colour; cleanlab's "add brown" alone is dropped
                  [0.90, 0.05, 0.05, 0.2, 0.1]])   # c: bag flagged (not in a group): stays a pair
    mask = np.zeros(y.shape, bool)
    mask[0, 0] = mask[0, 1] = mask[1, 1] = mask[2, 4] = True
    swaps = _group_swaps(mask, y, s, np.abs(y - s), names, paths, [[0, 1, 2]])  # shoe and bag: free labels
    assert [(p, lb, g, sg) for p, lb, g, sg, _, _ in swaps] == [("a.jpg", "black -> brown", 1, 0)]
    assert [tuple(map(int, ij)) for ij in zip(*mask.nonzero())] == [(2, 4)]  # only the pair outside the group stays
    data = tmp_path / "ds"
    data.mkdir()
    (data / "labels.csv").write_text("path,labels\na.jpg,black shoe\nb.jpg,white bag\nc.jpg,black bag\nd.jpg,brown bag\n")
    for p in [*paths, "d.jpg"]:
        from PIL import Image

        Image.new("RGB", (8, 8)).save(data / p)
    acc = tmp_path / "accepted.csv"
    acc.write_text("path,label,given,suggested,score,confidence\na.jpg,black -> brown,1,0,0.98,0.99\n")
    out = apply_review(acc, data / "labels.csv", "csv")
    got = {row.split(",")[0]: set(row.split(",")[1].split()) for row in out.read_text().splitlines()[1:]}
    assert got == {"a.jpg": {"brown", "shoe"}, "b.jpg": {"white", "bag"}, "c.jpg": {"black", "bag"},
                   "d.jpg": {"brown", "bag"}}
    from mltag.errors import MltagError

    acc.write_text("path,label,given,suggested,score,confidence\nb.jpg,black -> brown,1,0,0.98,0.99\n")
    with pytest.raises(MltagError, match="b.jpg has black=0 and brown=0 in the dataset now"):
        apply_review(acc, data / "labels.csv", "csv", out=tmp_path / "x.csv")


def test_an_at_most_one_group_predicts_its_top_label_only_over_its_threshold(tmp_path):
    """Declared ``at most one:`` groups: an image may have none of them; a recorded group keeps its kind."""
    from mltag.data.groups import check_declared, parse_groups
    from mltag.errors import MltagError

    labels = ["red", "blue", "sale", "new", "shoe"]
    groups = parse_groups("red, blue; at most one: sale,new", labels, "params.yaml")
    assert groups == [["red", "blue"], {"at_most_one": ["sale", "new"]}]
    y = np.array([[1, 0, 0, 0, 1], [0, 1, 1, 0, 0], [1, 0, 0, 1, 0]])
    check_declared(groups, labels, y, ["a", "b", "c"], "params.yaml")  # none of sale/new is fine
    with pytest.raises(MltagError, match=r"at most one of sale, new, but 1 image\(s\).*e.g. d \(2\)"):
        check_declared(groups, labels, np.vstack([y, [1, 0, 1, 1, 0]]), ["a", "b", "c", "d"], "params.yaml")
    th = {"thresholds": {"red": 0.5, "blue": 0.5, "sale": 0.6, "new": 0.5, "shoe": 0.5},
          "groups": [["red", "blue"]], "at_most_one": [["sale", "new"]]}
    t, ml, g = M.decision_rule(th, labels)
    s = np.array([[0.3, 0.2, 0.7, 0.9, 0.1],    # new over threshold and on top: new only
                  [0.3, 0.2, 0.55, 0.4, 0.1]])  # sale on top but under its 0.6: neither
    assert M.decide(s, t, ml, g).astype(int).tolist() == [[1, 0, 0, 1, 0], [1, 0, 0, 0, 0]]


def test_groups_read_the_same_on_every_line_that_names_them():
    """prepare's line and calibrate's log name recorded groups one way: exactly-one as a set, at-most-one said so."""
    from mltag.data.groups import describe, parse_groups

    labels = ["black", "blue", "dress", "shoe", "sale", "new"]
    groups = parse_groups("black,blue; dress,shoe; at most one: sale,new", labels, "params.yaml")
    assert describe(groups) == "{black, blue}; {dress, shoe}; at most one of {sale, new}"
    assert describe([]) == ""
