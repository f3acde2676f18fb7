"""The built-in backbones' parts: weights layout, variants, the resolver's refusals, the cache location."""

from __future__ import annotations

import os
import pickle

import pytest

from mltag.backbones import builtin as bb
from mltag.backbones import colour
from mltag.backbones.weights import load_legacy_state_dict
from mltag.errors import MltagError


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_state_dict_layout():
    state = bb.load_state("efficientnet_lite0")
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert sum(1 for k in state if k.endswith("_depthwise_conv.weight")) == 16
    assert len(bb.lite_blocks("efficientnet_lite0")) == 16


def test_larger_variants_scale_width_and_depth_but_not_stem_or_head():
    b0, b1, b2 = (bb.lite_blocks(n) for n in bb.BUILTIN_SPECS)
    assert (len(b0), len(b1), len(b2)) == (16, 21, 21)
    # Lite2 widens every stage by 1.1 (rounded to 8): 16->16, 24->24, 40->48, 80->88, 112->120, 192->208, 320->352.
    assert sorted({b[4] for b in b2}) == [16, 24, 48, 88, 120, 208, 352]
    assert b0[0][3] == b1[0][3] == b2[0][3] == 32  # the stem stays at 32 channels
    for name in bb.BUILTIN_SPECS:
        state = bb.load_state(name)
        assert state["_conv_head.weight"].shape[0] == 1280
        assert sum(1 for k in state if k.endswith("_depthwise_conv.weight")) == len(bb.lite_blocks(name))


def test_fine_tune_takes_every_builtin_and_refuses_other_modules():
    from mltag.steps.finetune import builtin_name

    assert builtin_name("builtin:efficientnet_lite2") == "efficientnet_lite2"
    assert builtin_name("builtin:efficientnet_lite2_ms") == "efficientnet_lite2_ms"
    with pytest.raises(MltagError, match=r"needs a built-in backbone .*efficientnet_lite0_ms.*got 'builtin:lite9'"):
        builtin_name("builtin:lite9")




def test_restricted_unpickler_refuses_code(tmp_path):
    f = tmp_path / "evil.pth"
    with open(f, "wb") as fh:
        pickle.dump(0x1950A86A20F9469CFC6C, fh)
        pickle.dump(1001, fh)
        pickle.dump({}, fh)
        pickle.dump(Evil(), fh)
    with pytest.raises(MltagError, match="refusing to load posix.system"):
        load_legacy_state_dict(f)
    # the very first pickle (where the magic number belongs) is read by the restricted unpickler too
    first = tmp_path / "evil-first.pth"
    with open(first, "wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(MltagError, match="refusing to load posix.system"):
        load_legacy_state_dict(first)
    g = tmp_path / "junk.pth"
    g.write_bytes(b"not a pickle")
    with pytest.raises(MltagError, match="not a legacy torch state dict"):
        load_legacy_state_dict(g)


def test_the_backbone_cache_follows_the_setting_then_the_environment_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("MLTAG_BACKBONE_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bb.cache_root(tmp_path / "mine") == tmp_path / "mine"
    assert bb.cache_root("") == tmp_path / "env"
    monkeypatch.delenv("MLTAG_BACKBONE_CACHE")
    assert bb.cache_root("") == tmp_path / "xdg" / "mltag" / "backbones"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bb.cache_root(None) == tmp_path / "home" / ".cache" / "mltag" / "backbones"


def test_colour_joins_a_network_as_a_part_with_its_own_id_and_no_size():
    assert bb.parts("efficientnet_lite2_ms+colour") == ["efficientnet_lite2_ms", "colour"]
    assert bb.split_colour("builtin:efficientnet_lite2_ms+colour") == ("builtin:efficientnet_lite2_ms", True)
    assert bb.split_colour("efficientnet_lite0+efficientnet_lite2") == ("efficientnet_lite0+efficientnet_lite2", False)
    assert bb.default_image_size("builtin:efficientnet_lite2_ms+colour") == bb.default_image_size(
        "builtin:efficientnet_lite2_ms")
    assert bb.builtin_id("efficientnet_lite2_ms+colour") == (bb.builtin_id("efficientnet_lite2_ms")
                                                             + f"+builtin:colour@v={colour.COLOUR_VERSION}")
    for bad in ("colour", "colour+colour", "efficientnet_lite0+colour+colour", "colour+efficientnet_lite0"):
        with pytest.raises(MltagError, match=r"'\+colour' \(a colour histogram"):
            bb.parts(bad)
