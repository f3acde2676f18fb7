"""prepare: every input format, every validation case, stable stratified splits."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import COLOURS, colour_image, make_colour_dataset, write_lst_dataset
from mltag.config import sections
from mltag.data.datasets import detect_format
from mltag.data.formats import read_lst
from mltag.data.images import BadImage, load_image
from mltag.errors import MltagError
from mltag.steps.prepare import prepare


def lst_rows(out: Path) -> dict[str, list[str]]:
    return {s: (out / f"{s}.lst").read_text().splitlines() for s in ("train", "val", "test")}


# --------------------------------------------------------------------------- formats


def to_labels_json(rows, root: Path, src: Path):
    (root / "images").mkdir(parents=True)
    vectors = []
    for i, (p, flags) in enumerate(rows, 1):
        shutil.copy(src / p, root / "images" / f"{i}.jpg")
        vectors.append([1 if f else -1 for f in flags])
    (root / "labels.json").write_text(json.dumps(vectors, indent=1))
    (root / "labels.txt").write_text("\n".join(COLOURS) + "\n")


def to_image_list(rows, root: Path, src: Path):
    shutil.copytree(src / "images", root / "images")
    (root / "labels.txt").write_text("\n".join(COLOURS) + "\n")
    (root / "image_list").write_text("".join(f"{p} {sum(f)}\n" for p, f in rows))
    (root / "image_label").write_text("".join(" ".join(map(str, f)) + "\n" for _, f in rows))


def to_csv(rows, root: Path, src: Path):
    shutil.copytree(src / "images", root / "images")
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "labels"])
        for p, f in rows:
            w.writerow([p, " ".join(c for c, x in zip(COLOURS, f) if x)])
    (root / "labels.txt").write_text("\n".join(COLOURS) + "\n")


@pytest.fixture
def rows_and_src(tmp_path):
    src = tmp_path / "src"
    rows = make_colour_dataset(src, n=40)
    write_lst_dataset(src, rows)
    return rows, src


@pytest.mark.parametrize("fmt", ["image_list", "csv"])
def test_formats_convert_to_identical_lst(tmp_path, rows_and_src, fmt):
    rows, src = rows_and_src
    prepare(tmp_path / "from_lst", **sections("prepare", input=src), progress=False)
    root = tmp_path / fmt
    {"image_list": to_image_list, "csv": to_csv}[fmt](rows, root, src)
    assert detect_format(root) == fmt
    prepare(tmp_path / "other", **sections("prepare", input=root), progress=False)
    assert lst_rows(tmp_path / "other") == lst_rows(tmp_path / "from_lst")
    assert (tmp_path / "other" / "labels.txt").read_text() == (tmp_path / "from_lst" / "labels.txt").read_text()


def test_labels_json_format(tmp_path, rows_and_src):
    rows, src = rows_and_src
    root = tmp_path / "lj"
    to_labels_json(rows, root, src)
    assert detect_format(root) == "labels_json"
    r = prepare(tmp_path / "out", **sections("prepare", input=root), progress=False)
    got = {ex.path: ex.flags for s in ("train", "val", "test") for ex in read_lst(tmp_path / "out" / f"{s}.lst")}
    assert got == {f"images/{i}.jpg": f for i, (_, f) in enumerate(rows, 1)}
    assert r["format"] == "labels_json"


def test_folder_per_class_becomes_one_label_rows(tmp_path):
    rng = np.random.default_rng(0)
    for j, c in enumerate(COLOURS):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(8):
            colour_image(tuple(int(k == j) for k in range(3)), rng).save(tmp_path / "f" / c / f"{i}.jpg")
    assert detect_format(tmp_path / "f") == "folders"
    prepare(tmp_path / "out", **sections("prepare", input=tmp_path / "f"), progress=False)
    labels = (tmp_path / "out" / "labels.txt").read_text().split()
    assert labels == sorted(COLOURS)
    for s in ("train", "val", "test"):
        for ex in read_lst(tmp_path / "out" / f"{s}.lst"):
            assert sum(ex.flags) == 1 and labels[ex.flags.index(1)] == ex.path.split("/")[0]


def test_ambiguous_input_asks_for_format(tmp_path, rows_and_src):
    rows, src = rows_and_src
    to_csv(rows, tmp_path / "both", src)
    write_lst_dataset(tmp_path / "both", rows)
    with pytest.raises(MltagError, match="ambiguous input: looks like lst and csv; pass --format"):
        prepare(tmp_path / "out", **sections("prepare", input=tmp_path / "both"), progress=False)
    prepare(tmp_path / "out", **sections("prepare", input=tmp_path / "both", format="csv"), progress=False)


# --------------------------------------------------------------------------- label-file validation


def lst_case(tmp_path, lines, labels="red\ngreen\nblue\n"):
    d = tmp_path / "case"
    d.mkdir(exist_ok=True)
    (d / "labels.txt").write_text(labels)
    (d / "all.lst").write_text("".join(x + "\n" for x in lines))
    return d


@pytest.mark.parametrize("lines,message", [
    (["0\t1\t0\t0\ta.jpg", "1\t0\t1\t0\ta.jpg"], r"all.lst:2: duplicate path 'a.jpg' \(first on line 1\)"),
    (["0\t1\t0\t0\ta.jpg", "0\t0\t1\t0\tb.jpg"], r"all.lst:2: duplicate index '0' \(first on line 1\)"),
    (["0\t1\t0\ta.jpg"], r"all.lst:1: expected 3 label flags, got 2"),
    (["0\t1\t0\t-1\ta.jpg"], r"all.lst:1: label flags must be 0 or 1, got '-1'"),
    (["0\t1\t0\t0\t../secret.jpg"], r"all.lst:1: image path '../secret.jpg' leads outside the image root"),
    (["0\t1\t0\t0\t/etc/passwd"], r"all.lst:1: absolute image path '/etc/passwd' is not allowed"),
    (["0 1 0 0 a.jpg"], r"all.lst:1: expected index<TAB>flags...<TAB>path"),
])
def test_lst_errors_name_file_and_line(tmp_path, lines, message):
    d = lst_case(tmp_path, lines)
    with pytest.raises(MltagError, match=message):
        prepare(tmp_path / "out", **sections("prepare", input=d), progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_label_file_and_input(tmp_path):
    with pytest.raises(MltagError, match="input not found"):
        prepare(tmp_path / "out", **sections("prepare", input=tmp_path / "nope"), progress=False)
    d = tmp_path / "d"
    d.mkdir()
    (d / "all.lst").write_text("0\t1\ta.jpg\n")
    with pytest.raises(MltagError, match="no label names found"):
        prepare(tmp_path / "out", **sections("prepare", input=d), progress=False)


def test_labels_json_rejects_values_other_than_plus_minus_one(tmp_path, rows_and_src):
    rows, src = rows_and_src
    root = tmp_path / "lj"
    to_labels_json(rows, root, src)
    data = json.loads((root / "labels.json").read_text())
    data[2][1] = 0
    (root / "labels.json").write_text(json.dumps(data, indent=1))
    # indent=1: line 1 is "[", then five lines per vector; the third vector opens on line 12.
    assert (root / "labels.json").read_text().splitlines()[11] == " ["
    with pytest.raises(MltagError, match=r"labels.json:12: vector values must be 1 or -1 in this format, got 0"):
        prepare(tmp_path / "out", **sections("prepare", input=root), progress=False)


def test_image_list_count_must_match_row(tmp_path, rows_and_src):
    rows, src = rows_and_src
    root = tmp_path / "il"
    to_image_list(rows, root, src)
    text = (root / "image_list").read_text().splitlines()
    name, count = text[4].split()
    text[4] = f"{name} {int(count) + 1}"
    (root / "image_list").write_text("\n".join(text) + "\n")
    with pytest.raises(MltagError, match=r"image_list:5: count column says \d labels but line 5 of image_label has"):
        prepare(tmp_path / "out", **sections("prepare", input=root), progress=False)
    to_image_list(rows, tmp_path / "il2", src)
    (tmp_path / "il2" / "image_label").write_text("1 0 0\n")
    with pytest.raises(MltagError, match="image_list has 40 entries but image_label has 1 rows"):
        prepare(tmp_path / "out", **sections("prepare", input=tmp_path / "il2"), progress=False)


def test_csv_unknown_label(tmp_path, rows_and_src):
    rows, src = rows_and_src
    to_csv(rows, tmp_path / "c", src)
    with open(tmp_path / "c" / "train.csv", "a") as fh:
        fh.write("images/0001.jpg,red purple\n")
    with pytest.raises(MltagError, match=r"train.csv:42: unknown label 'purple'"):
        prepare(tmp_path / "out", **sections("prepare", input=tmp_path / "c"), progress=False)


def test_label_with_too_few_examples(tmp_path, rows_and_src):
    rows, src = rows_and_src
    rows = [(p, (f[0], f[1], 0)) for p, f in rows]
    rows[0] = (rows[0][0], (1, 0, 1))
    rows[1] = (rows[1][0], (1, 0, 1))
    write_lst_dataset(src, rows)
    with pytest.raises(MltagError, match="label 'blue' has 2 usable example"):
        prepare(tmp_path / "out", **sections("prepare", input=src), progress=False)


def test_images_without_labels_keep_or_reject(tmp_path, rows_and_src):
    rows, src = rows_and_src
    rows[0] = (rows[0][0], (0, 0, 0))
    write_lst_dataset(src, rows)
    kept = prepare(tmp_path / "keep", **sections("prepare", input=src), progress=False)
    assert kept["images_used"] == 40
    rej = prepare(tmp_path / "reject", **sections("prepare", input=src, no_label="reject"), progress=False)
    assert rej["images_used"] == 39
    assert rej["rejected"][0]["path"] == rows[0][0] and "no labels" in rej["rejected"][0]["reason"]


# --------------------------------------------------------------------------- images


def test_bad_images_are_skipped_and_reported(tmp_path, rows_and_src):
    rows, src = rows_and_src
    (src / rows[0][0]).write_bytes(b"")
    data = (src / rows[1][0]).read_bytes()
    (src / rows[1][0]).write_bytes(data[: len(data) // 2])
    (src / rows[2][0]).write_text("this is not an image")
    (src / rows[3][0]).unlink()
    Image.new("L", (3000, 3000)).save(src / rows[4][0], "PNG")
    r = prepare(tmp_path / "out", **sections("prepare", input=src, max_bad_fraction=0.2, max_pixels=4_000_000), progress=False)
    reasons = {x["path"]: x["reason"] for x in r["rejected"]}
    assert reasons[rows[0][0]] == "zero-byte file"
    assert "truncated" in reasons[rows[1][0]]
    assert "not an image" in reasons[rows[2][0]]
    assert reasons[rows[3][0]] == "file not found"
    assert "exceeds the cap of 4000000" in reasons[rows[4][0]]
    assert all(x["source"].endswith(f"all.lst:{i + 1}") for i, x in enumerate(r["rejected"]))
    assert r["images_used"] == 35
    assert "zero-byte file" in (tmp_path / "out" / "report.html").read_text()
    with pytest.raises(MltagError, match=r"5 of 40 images are unusable \(12.5% > prepare.max_bad_fraction=5.0%\)"):
        prepare(tmp_path / "out2", **sections("prepare", input=src, max_pixels=4_000_000), progress=False)


def test_modes_and_exif_are_normalised(tmp_path):
    rgb = Image.new("RGB", (40, 20), (200, 30, 30))
    cases = {
        "gray.png": rgb.convert("L"),
        "palette.png": rgb.convert("P"),
        "alpha.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "sixteen.png": Image.fromarray((np.full((20, 40), 40000)).astype(np.uint16)),
        "pic.webp": rgb,
        "pic.bmp": rgb,
        "pic.gif": rgb.convert("P"),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        px = load_image(tmp_path / name, 16)
        assert px.shape == (16, 16, 3) and px.dtype == np.uint8, name
    assert abs(int(load_image(tmp_path / "cmyk.jpg", 8)[4, 4, 0]) - 200) < 12
    assert abs(int(load_image(tmp_path / "sixteen.png", 8)[4, 4, 0]) - round(40000 / 65535 * 255)) <= 1
    # EXIF orientation 6 (rotate 90 CW): a 40x20 landscape becomes 20x40 portrait.
    tall = Image.new("RGB", (40, 20), (0, 0, 0))
    tall.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    tall.save(tmp_path / "exif.jpg", exif=exif.tobytes())
    px = load_image(tmp_path / "exif.jpg", 40)
    assert px[:18].mean() > 200 and px[22:].mean() < 50  # white moved to the top
    with pytest.raises(BadImage, match="zero-byte"):
        (tmp_path / "empty.jpg").write_bytes(b"")
        load_image(tmp_path / "empty.jpg", 8)


def test_duplicates_share_a_split_and_near_duplicates_are_reported(tmp_path, rows_and_src):
    rows, src = rows_and_src
    for i in range(5):  # five exact copies of image 0 under other names
        shutil.copy(src / rows[0][0], src / "images" / f"copy{i}.jpg")
        rows.append((f"images/copy{i}.jpg", rows[0][1]))
    # The same picture re-encoded (different bytes): a near duplicate, possibly in another split.
    Image.open(src / rows[1][0]).save(src / "images" / "near.png")
    rows.append(("images/near.png", rows[1][1]))
    write_lst_dataset(src, rows)
    pair = sorted([rows[1][0], "images/near.png"])
    group = [rows[0][0]] + [f"images/copy{i}.jpg" for i in range(5)]
    for salt in (f"s{i}" for i in range(50)):
        r = prepare(tmp_path / "out", **sections("prepare", input=src, salt=salt), progress=False)
        split_of = {ex.path: s for s in ("train", "val", "test") for ex in read_lst(tmp_path / "out" / f"{s}.lst")}
        assert len({split_of[p] for p in group}) == 1
        assert sorted(group) in r["exact_duplicates"]
        if split_of[pair[0]] != split_of[pair[1]]:
            break
    else:
        pytest.fail("no salt put the near-duplicate pair in different splits")
    assert any(n["paths"] == pair for n in r["near_duplicates_across_splits"])


# --------------------------------------------------------------------------- splits


def test_adding_ten_percent_keeps_every_old_image_in_its_split(tmp_path):
    src = tmp_path / "d"
    rows = make_colour_dataset(src, n=100)
    write_lst_dataset(src, rows)
    prepare(tmp_path / "v1", **sections("prepare", input=src), progress=False)
    before = {ex.path: s for s in ("train", "val", "test") for ex in read_lst(tmp_path / "v1" / f"{s}.lst")}
    rows += make_colour_dataset(src, n=10, seed=5, start=100)
    write_lst_dataset(src, rows)
    r = prepare(tmp_path / "v2", **sections("prepare", input=src), progress=False)
    after = {ex.path: s for s in ("train", "val", "test") for ex in read_lst(tmp_path / "v2" / f"{s}.lst")}
    assert len(after) == 110
    assert {p: after[p] for p in before} == before
    for label, counts in r["examples_per_label"].items():
        assert all(counts[s] > 0 for s in ("train", "val", "test")), label


def test_every_label_reaches_every_split(tmp_path):
    src = tmp_path / "d"
    rows = make_colour_dataset(src, n=30)
    rows = [(p, (f[0], f[1], 0)) for p, f in rows]
    for i in range(3):  # a rare label with three examples
        rows[i] = (rows[i][0], (rows[i][1][0], rows[i][1][1], 1))
    write_lst_dataset(src, rows)
    r = prepare(tmp_path / "out", **sections("prepare", input=src), progress=False)
    assert r["examples_per_label"]["blue"] == {"train": 1, "val": 1, "test": 1}


def test_report_contents(tmp_path, rows_and_src):
    rows, src = rows_and_src
    r = prepare(tmp_path / "out", **sections("prepare", input=src), progress=False)
    y = np.array([f for _, f in rows])
    assert r["cooccurrence"] == (y.T @ y).tolist()
    assert r["label_cardinality"]["mean"] == pytest.approx(y.sum(1).mean())
    assert sum(r["images_per_split"].values()) == 40
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["examples_per_label"] == r["examples_per_label"]
    assert "data:image/png;base64," in (tmp_path / "out" / "report.html").read_text()


def test_labels_json_dict_forms(tmp_path, rows_and_src):
    rows, src = rows_and_src
    root = tmp_path / "lj"
    to_labels_json(rows, root, src)
    vectors = json.loads((root / "labels.json").read_text())
    (root / "labels.json").write_text(json.dumps({str(i): v for i, v in enumerate(vectors, 1)}))
    a = prepare(tmp_path / "a", **sections("prepare", input=root), progress=False)
    (root / "labels.txt").unlink()
    (root / "labels.json").write_text(json.dumps({"labels": COLOURS, "vectors": vectors}))
    b = prepare(tmp_path / "b", **sections("prepare", input=root), progress=False)
    assert lst_rows(tmp_path / "a") == lst_rows(tmp_path / "b")
    assert a["images_used"] == b["images_used"] == 40


def test_report_html_escapes_and_lists_rejections_and_repairs():
    from mltag.steps.prepare import report_html

    report = {
        "source": "data/<in>", "format": "csv", "dataset_version": "v1", "labels": ["<i>a</i>", "b"],
        "images_listed": 5, "images_used": 4, "images_per_split": {"train": 2, "val": 1, "test": 1},
        "examples_per_label": {"<i>a</i>": {"train": 2, "val": 1, "test": 1}, "b": {"train": 1, "val": 0, "test": 1}},
        "label_cardinality": {"mean": 1.25, "histogram": {}}, "cooccurrence": [[4, 1], [1, 2]],
        "rejected": [{"path": "x&y.jpg", "source": "labels.csv:6", "reason": "not an image <eps>"}],
        "exact_duplicates": [["p.jpg", "q.jpg"]], "near_duplicates_across_splits": [],
        "stratification_repairs": [{"label": "b", "moved": "z.jpg", "from": "train", "to": "test"}],
    }
    page = report_html(report)
    assert "<i>" not in page and "&lt;i&gt;a&lt;/i&gt;" in page and "data/&lt;in&gt;" in page
    assert "x&amp;y.jpg</td><td>labels.csv:6</td><td>not an image &lt;eps&gt;" in page
    assert "train 2, val 1, test 1." in page and "version v1" in page and "Mean labels per image 1.25" in page
    assert "1 groups of identical images" in page and "z.jpg moved from train to test" in page
    assert page.count("data:image/png;base64,") == 1


def test_a_dataset_without_a_single_label_is_one_clear_error(tmp_path):
    """#51: a label file whose every label list is empty crashed prepare with a traceback in the report's
    co-occurrence plot; now one error naming the file, and nothing is written."""
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        colour_image((1, 0, 0), rng).save(tmp_path / "images" / f"{i:02d}.jpg")
    (tmp_path / "labels.csv").write_text("path,labels\n" + "".join(f"images/{i:02d}.jpg,\n" for i in range(12)))
    with pytest.raises(MltagError, match=r"labels.csv: no image has a label \(12 images"):
        prepare(tmp_path / "out", **sections("prepare", input=tmp_path / "labels.csv"), progress=False)
    assert not (tmp_path / "out").exists()


def test_every_broken_row_of_a_csv_is_reported_in_one_run_up_to_a_bound(tmp_path):
    """#51: a 10,000-row CSV with 5% broken rows was reported one row per run; now every kind of row error is
    gathered (too many columns, an unknown label, a duplicate, an absolute path): the first 20, then the count."""
    rows = ["path,labels"] + [f"images/{i:05d}.jpg,red" for i in range(10000)]
    for i in range(1, 10001, 20):
        rows[i] = rows[i].replace(",red", ",red,green")  # 500 rows with a third column
    rows[7] = "/etc/passwd,red"
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "labels.txt").write_text("red\n")
    with pytest.raises(MltagError) as e:
        prepare(tmp_path / "out", **sections("prepare", input=tmp_path / "labels.csv"), progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'labels.csv'}: 501 broken rows") and "... and 481 more" in msg, msg[:300]
    assert "line 2: expected 2 columns, got 3" in msg and "line 8: absolute image path '/etc/passwd'" in msg
    assert msg.count("\n  line ") == 20 and not (tmp_path / "out").exists()
