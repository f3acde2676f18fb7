"""register at the sizes users have: nothing it hands a child process grows with the data."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
from PIL import Image


def test_the_warm_up_takes_5000_test_images_through_a_pipe_not_argv(tmp_path, fake_backbone):
    """5,000 test images made one argv string of about 600 KB before: past Linux's 128 KiB cap for one
    argument ('Argument list too long'). Through stdin the child's command line stays a few hundred bytes
    and it computes every image's features."""
    from mltag.data.formats import write_model_meta
    from mltag.inference.export import BACKBONE_DIR
    from mltag.inference.lanes import hash_files
    from mltag.steps import register as rg

    model = tmp_path / "model"
    shutil.copytree(fake_backbone, model / BACKBONE_DIR)
    write_model_meta(model, {"labels": ["a", "b", "c"], "image_size": 32, "mode": "head",
                             "backbone_handle": str(fake_backbone), "backbone_id": "pool-warm-test"})
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    images = []
    for i in range(5000):  # a long path each, as a real dataset's are
        p = tmp_path / "images" / f"a-rather-long-folder-name-for-photo-{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(p)
        images.append(p)
    hashes = hash_files(images)
    assert sum(len(str(p)) + 70 for p in images) > 128 * 1024  # what argv would have carried

    proc = rg.start_warm(model, images, hashes, stderr=subprocess.PIPE)
    cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert len(cmdline) < 2048
    from mltag.inference.engine import litert_backbone

    meta = {"backbone_handle": str(fake_backbone), "backbone_id": "pool-warm-test"}
    lite = litert_backbone(rg._folder_backbone(model, meta), 32, "", kind="dynamic_range")
    assert rg._memo_has(lite, hashes)
    features = rg.memo_features(lite, images[:3], hashes[:3], 32)  # from the memo: the pooled colours
    assert features.shape == (3, 6) and np.isfinite(features).all()
