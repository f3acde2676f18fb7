"""Bad input caught where it enters: damaged packs, disguised files, odd encodings, symlinks, masked URIs, option-like revisions."""

from __future__ import annotations

import numpy as np
import pytest

from mltag.config import sections
from mltag.data.store import FeatureCache
from mltag.steps.prepare import prepare


def test_garbage_with_a_valid_header_is_caught_by_the_checksum(tmp_path):
    """Bit rot inside the data of a finite float16 vector still loads as numbers; the stored hash catches it."""
    cache = FeatureCache(tmp_path / "c", "backbone-x", 32)
    vec = np.linspace(-1, 1, 16).astype(np.float16)
    key = cache.key("a" * 64, 0)
    cache.put(key, vec)
    f = next((tmp_path / "c").rglob("*.pack"))
    data = bytearray(f.read_bytes())
    data[-4] ^= 0x01  # one flipped bit in the last values: still finite, still the right shape
    f.write_bytes(bytes(data))
    assert cache.get(key) is None and cache.rejected == 1


def test_eps_renamed_jpg_is_refused_everywhere(tmp_path):
    from mltag.data.images import BadImage, load_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
    f = tmp_path / "evil.jpg"
    f.write_bytes(eps)
    with pytest.raises(BadImage, match="supported format"):
        load_image(f, 32)
    with pytest.raises(BadImage, match="supported format"):
        load_image(eps, 32)  # serving decodes bytes through the same function


def test_bom_and_non_utf8_label_files(tmp_path, colour_dataset):
    from mltag.data.formats import read_labels
    from mltag.errors import MltagError

    bom = tmp_path / "labels.txt"
    bom.write_bytes("\ufeffdesert\nsea\n".encode("utf-8"))
    assert read_labels(bom) == ["desert", "sea"]
    csv_dir = tmp_path / "csvdata"
    (csv_dir / "images").mkdir(parents=True)
    rows = ["\ufeffpath,labels"]
    for i, img in enumerate(sorted((colour_dataset / "images").iterdir())[:20]):
        (csv_dir / "images" / img.name).write_bytes(img.read_bytes())
        rows.append(f"images/{img.name},{'red' if i % 2 else 'blue'}")
    (csv_dir / "data.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    r = prepare(tmp_path / "prep", **sections("prepare", input=csv_dir), progress=False)
    assert r["format"] == "csv" and r["images_used"] == 20
    latin = tmp_path / "latin" / "labels.txt"
    latin.parent.mkdir()
    latin.write_bytes(b"desert\nfor\xeat\n")
    with pytest.raises(MltagError, match=r"labels.txt:2: not UTF-8"):
        read_labels(latin)


def test_symlinks_out_of_the_image_root_are_refused_unless_allowed(tmp_path, colour_dataset):
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    images = sorted((colour_dataset / "images").iterdir())
    secret = outside / "secret.jpg"
    secret.write_bytes(images[0].read_bytes())
    images[0].unlink()
    images[0].symlink_to(secret)  # a file link leaving the root
    (outside / "dir" / "more.jpg").write_bytes(images[1].read_bytes())
    (colour_dataset / "linked").symlink_to(outside / "dir")  # a folder link leaving the root
    (colour_dataset / "images" / "alias.jpg").symlink_to(images[2])  # a link that stays inside is fine
    lst = colour_dataset / "all.lst"
    flags = lst.read_text().splitlines()[1].split("\t")[1:-1]
    lst.write_text(lst.read_text() + "".join(f"{i}\t" + "\t".join(flags) + f"\t{p}\n"
                                             for i, p in ((900, "linked/more.jpg"), (901, "images/alias.jpg"))))
    r = prepare(tmp_path / "p1", **sections("prepare", input=colour_dataset), progress=False)
    reasons = {x["path"]: x["reason"] for x in r["rejected"]}
    assert sorted(reasons) == [f"images/{images[0].name}", "linked/more.jpg"], reasons
    assert all("outside the image root" in why and "follow_symlinks" in why for why in reasons.values())
    kept = "".join((tmp_path / "p1" / f"{s}.lst").read_text() for s in ("train", "val", "test"))
    assert "images/alias.jpg" in kept and "linked/" not in kept and images[0].name not in kept
    r = prepare(tmp_path / "p2", **sections("prepare", input=colour_dataset, follow_symlinks=True), progress=False)
    assert r["rejected"] == [] and r["images_used"] == 50


def test_mask_uri_keeps_scheme_host_and_path_only():
    from mltag.tracking.runs import mask_uri, scrub

    assert mask_uri("http://user:pw@127.0.0.1:5000/mlflow?token=abc#x") == "http://127.0.0.1:5000/mlflow"
    assert mask_uri("https://tok@[::1]:443/") == "https://[::1]:443/"
    assert mask_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
    assert mask_uri("databricks") == "databricks"
    uri = "http://alice:p%40ss@h:1/x?token=abc"
    assert scrub(f"GET {uri}/health failed for alice with p@ss and abc", uri) == \
        "GET http://h:1/x/health failed for *** with *** and ***"
    short = "http://u:Secr3tPw@127.0.0.1:5200"
    assert scrub("ConnectionRefusedError: runs/update for u: Could not find u:Secr3tPw@127.0.0.1 (Secr3tPw)", short) \
        == "ConnectionRefusedError: runs/update for ***: Could not find ***@127.0.0.1 (***)"


@pytest.mark.parametrize("value", ["--version", "--get-url", "-u/tmp/x"])
def test_a_data_repo_or_revision_that_looks_like_an_option_is_refused(tmp_path, value):
    """Case 3: git never sees a user's value as one of its options."""
    from mltag.data.fetch import ImageSource, fetch_dataset, resolve_version
    from mltag.errors import MltagError

    with pytest.raises(MltagError, match="starts with '-', which git would read as an option"):
        resolve_version("d", value, "")
    with pytest.raises(MltagError, match="starts with '-'"):
        resolve_version("d", str(tmp_path), value)
    with pytest.raises(MltagError, match="starts with '-'"):
        fetch_dataset("d", value, "", tmp_path / "dest")
    with pytest.raises(MltagError, match="starts with '-'"):
        ImageSource("d", value)
