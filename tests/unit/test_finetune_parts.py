"""Fine-tuning's parts: the split network, its weights, the schedule and block groups."""

from __future__ import annotations

import numpy as np
import pytest

from mltag.backbones.builtin import LiteNet, load_state


@pytest.fixture(scope="module")
def lite0():
    return LiteNet("efficientnet_lite0")


def test_the_split_network_is_the_whole_network(lite0):
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).random((2, 64, 64, 3)), tf.float32)
    whole = lite0(x).numpy()
    for k in (0, 7, lite0.n_blocks - 2, lite0.n_blocks):
        np.testing.assert_allclose(lite0.top(lite0.bottom(x, k), k).numpy(), whole, atol=1e-5)
    names = {v.name for v in lite0.variables_from(lite0.n_blocks - 2)}
    assert names and all(n.startswith(("blocks/14/", "blocks/15/", "conv_head/", "bn1/")) for n in names), names
    assert not any("running" in n for n in names)  # batch-norm statistics never train


def test_state_dict_round_trips(lite0):
    state = load_state("efficientnet_lite0")
    again = lite0.state_dict()
    assert set(again) == set(state)
    for k in state:
        np.testing.assert_array_equal(again[k], state[k], err_msg=k)


def test_the_cosine_schedule_warms_up_then_decays_to_zero_and_blocks_are_grouped_top_first():
    """fine_tune_schedule cosine: linear warm-up over the first epoch, 1 at its end, 0 at the last
    step; constant: no schedule. block_groups: variables_from(k) by block, the top block (with the
    head convolution) first."""
    from mltag.backbones.builtin import LiteNet
    from mltag.steps.finetune import lr_schedule

    assert lr_schedule("constant", 10, 5) is None
    f = lr_schedule("cosine", 4, 10)
    assert [round(f(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == 1.0 and abs(f(39)) < 1e-12 and f(25) < f(15) < 1.0
    assert lr_schedule("cosine", 1, 10)(0) == 1.0  # one epoch: no warm-up
    net = LiteNet("efficientnet_lite0")
    groups = net.block_groups(13)
    assert len(groups) == 3
    flat = [v for g in groups for v in g]
    assert {id(v) for v in flat} == {id(v) for v in net.variables_from(13)} and len(flat) == len(set(map(id, flat)))
    assert any("conv_head" in v.name for v in groups[0]) and all("blocks/15" in v.name or "conv_head" in v.name
                                                                 or "bn1" == v.name.split("/")[0] for v in groups[0])
    # fine_tune_bn frozen: the same blocks without batch norm's scale and offset (the convolutions only)
    frozen = [v for g in net.block_groups(13, bn_affine=False) for v in g]
    assert frozen and {id(v) for v in frozen} < {id(v) for v in flat}
    assert all("conv" in v.name for v in frozen) and not any("/_bn" in v.name or "bn" in v.name.split("/")[-2]
                                                             for v in frozen)
