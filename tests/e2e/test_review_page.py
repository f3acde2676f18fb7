"""The review page as a working review tool, in a real browser (Debian's Chromium driven by Playwright):
keyboard decisions, progress, filters, decisions kept across a reload, and an export that `mltag review
apply --accept` reads."""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest

from conftest import COLOURS, blank_store, make_colour_dataset, run_cli, write_lst_dataset
from mltag.config import sections

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            raise AssertionError("chromium is missing: make install puts it there (apt-get install chromium)")
        pytest.skip("no chromium on this machine (make install installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def make_review(tmp_path):
    """A dataset whose out-of-fold scores contradict 6 of its labels, and its review."""
    from mltag.data.formats import write_oof
    from mltag.steps.review import review

    data = tmp_path / "colours"
    rows = make_colour_dataset(data, n=60)
    write_lst_dataset(data, rows)
    y = np.array([f for _, f in rows], np.uint8)
    rng = np.random.default_rng(0)
    s = np.clip(np.where(y == 1, 0.9, 0.1) + rng.normal(0, 0.03, y.shape), 0.01, 0.99)
    flips = [(3, 0), (8, 1), (15, 2), (22, 0), (31, 1), (40, 2)]
    for i, j in flips:
        s[i, j] = 0.02 if y[i, j] else 0.98
    write_oof(tmp_path / "oof.npz", [p for p, _ in rows], y, s, np.arange(len(y)) % 5, COLOURS)
    review(tmp_path / "oof.npz", tmp_path / "review", tmp_path / "review.json", images=data,
           **sections("review"), progress=False)
    return data, tmp_path / "review" / "review.html"


def test_review_by_keyboard_survives_a_reload_and_exports_what_review_apply_reads(tmp_path, browser):
    data, page_file = make_review(tmp_path)
    issues = list(csv.DictReader((tmp_path / "review" / "label_issues.csv").open()))
    assert len(issues) >= 6
    ctx = browser.new_context(accept_downloads=True)
    page = ctx.new_page()
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("file:", "data:", "blob:")) else None)
    page.goto(page_file.as_uri())
    n = len(issues) if len(issues) <= 24 * 3 else None
    assert page.locator("#progress").inner_text() == f"0 of {n} reviewed"
    first = page.locator("#t-path").inner_text()
    assert first.startswith(f"1 / {n}: ") and page.locator("#t-img").get_attribute("alt").startswith(first[len(f'1 / {n}: '):])
    page.keyboard.press("a")  # accept the first, reject the second, skip the third, accept the fourth
    page.keyboard.press("r")
    page.keyboard.press("s")
    page.keyboard.press("a")
    assert page.locator("#progress").inner_text() == f"4 of {n} reviewed"
    page.keyboard.press("ArrowLeft")
    assert page.locator("#t-path").inner_text().startswith(f"4 / {n}: ")
    assert page.locator("#t-state").inner_text() == "(accepted)"

    page.reload()  # decisions are kept
    assert page.locator("#progress").inner_text() == f"4 of {n} reviewed"
    assert page.locator("figure.accepted").count() == 2 and page.locator("figure.rejected").count() == 1

    page.select_option("#f-label", "green")  # a filter narrows what is shown
    green = sum(1 for r in issues if r["label"] == "green")
    assert page.locator("#t-path").inner_text().startswith(f"1 / {green}: ")
    page.select_option("#f-label", "")

    with page.expect_download() as dl:
        page.click("#export")
    exported = tmp_path / "accepted.csv"
    dl.value.save_as(exported)
    got = list(csv.DictReader(exported.open()))
    in_page = [r for lb in COLOURS for r in issues if r["label"] == lb]  # by label, most likely first
    assert [(r["path"], r["label"]) for r in got] == [(r["path"], r["label"]) for r in (in_page[0], in_page[3])]
    assert [r["given"] for r in got] == [in_page[0]["given"], in_page[3]["given"]]
    assert exported.read_text().splitlines()[0] == "path,label,given,suggested,score,confidence"
    assert not outside, f"the page loaded {outside}"

    p = run_cli("review", "apply", "--accept", str(exported), "--input", str(data), "--format", "lst", cwd=tmp_path)
    assert "corrected labels in" in p.stdout
    fixed = (data / "all.reviewed.lst").read_text()
    assert fixed != (data / "all.lst").read_text()
    ctx.close()


def test_the_page_works_by_keyboard_alone_and_every_image_has_alt_text(tmp_path, browser):
    _, page_file = make_review(tmp_path)
    page = browser.new_page()
    page.goto(page_file.as_uri())
    alts = page.eval_on_selector_all("img", "els => els.map(e => e.getAttribute('alt'))")
    assert alts and all(a and ("given" in a or "saliency map" in a or "where the model looked" in a) for a in alts if a is not None), alts
    page.focus("#b-accept")  # Tab order reaches the buttons; Enter presses them
    page.keyboard.press("Enter")
    assert page.locator("#progress").inner_text().startswith("1 of ")


def test_label_suggested_images_by_keyboard_then_prepare_reads_the_export(tmp_path, browser, fake_backbone):
    """suggest's labelling page: label toggles pre-filled with the model's labels, 5 images labelled by keyboard
    (number keys toggle, Enter is done), kept across a reload, exported as the CSV prepare reads."""
    from mltag.data.datasets import read_dataset
    from mltag.steps.bottleneck import bottleneck
    from mltag.steps.prepare import prepare
    from mltag.steps.train import train
    from mltag.tools.suggest import suggest

    data = tmp_path / "colours"
    write_lst_dataset(data, make_colour_dataset(data, n=60))
    prepare(tmp_path / "prepared", **sections("prepare", input=data), progress=False)
    store = tmp_path / "store"
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone),
                                                                  cache_dir=store, views=1), progress=False)
    train(tmp_path / "bn", tmp_path / "model", **sections("train", learning_rate=0.05, epochs=150, patience=30),
          tracking_uri=blank_store(tmp_path / "mlflow.db"), progress=False)
    new = tmp_path / "unlabelled"
    make_colour_dataset(new, n=12, seed=5, start=500)
    (new / "all.lst").unlink(missing_ok=True)
    r = suggest(str(tmp_path / "model"), str(new), 8, tmp_path / "suggest.csv", store=str(store), progress=False)
    page_file = tmp_path / "suggest.html"
    assert r["page"] == str(page_file) and page_file.is_file()
    picked = [row["path"] for row in csv.DictReader((tmp_path / "suggest.csv").open())]
    predicted = [row["predicted"].split() for row in csv.DictReader((tmp_path / "suggest.csv").open())]

    ctx = browser.new_context(accept_downloads=True)
    page = ctx.new_page()
    outside = []
    page.on("request", lambda q: outside.append(q.url) if not q.url.startswith(("file:", "data:", "blob:")) else None)
    page.goto(page_file.as_uri())
    assert page.locator("#progress").inner_text() == "0 of 8 labelled"
    checked = page.eval_on_selector_all("#toggles input", "els => els.filter(e => e.checked).map(e => e.dataset.label)")
    assert checked == predicted[0]  # pre-filled with the model's labels at its thresholds
    alts = page.eval_on_selector_all("img", "els => els.map(e => e.getAttribute('alt'))")
    assert all(a and os.path.basename(a.split(":")[0]) for a in alts), alts
    # the labels each of the first 5 images should end with, set from the pre-filled ones by number keys
    wanted = [["red"], ["green", "blue"], [], ["red", "green", "blue"], ["blue"]]
    for want in wanted:
        have = set(page.eval_on_selector_all("#toggles input", "els => els.filter(e => e.checked).map(e => e.dataset.label)"))
        for j, lb in enumerate(COLOURS):
            if (lb in have) != (lb in want):
                page.keyboard.press(str(j + 1))
        page.keyboard.press("Enter")
    # a label the model does not know, from the keyboard (#54): "/" to the box, its name, Enter; it gets a key
    page.keyboard.press("/")
    page.keyboard.type("striped")
    page.keyboard.press("Enter")
    sixth = page.eval_on_selector_all("#toggles input", "els => els.filter(e => e.checked).map(e => e.dataset.label)")
    assert sixth == predicted[5] + ["striped"], sixth
    page.keyboard.press("Enter")
    assert page.locator("#progress").inner_text() == "6 of 8 labelled"
    page.reload()  # choices are kept, the new label too
    assert page.locator("#progress").inner_text() == "6 of 8 labelled"
    assert page.locator("figure.done").count() == 6
    assert page.locator("#toggles kbd").all_inner_texts() == ["1", "2", "3", "4"]  # every label has its key
    page.keyboard.press("ArrowLeft")
    assert page.locator("#t-path").inner_text().startswith("6 / 8: ") and page.locator("#t-state").inner_text() == "(done)"
    with page.expect_download() as dl:
        page.click("#export")
    exported = new / "labels.csv"
    dl.value.save_as(exported)
    assert not outside, f"the page loaded {outside}"
    ctx.close()

    rows = list(csv.DictReader(exported.open()))
    assert [os.path.join(new, row["path"]) for row in rows] == [os.path.abspath(p) for p in picked[:6]]
    assert [row["labels"].split() for row in rows] == wanted + [predicted[5] + ["striped"]]
    ds = read_dataset(exported, "csv")  # prepare reads the export as it is
    assert ds.fmt == "csv" and ds.labels == sorted(COLOURS + ["striped"])  # no labels.txt beside it: sorted
    got = {e.path: {lb for lb, f in zip(ds.labels, e.flags) if f} for e in ds.examples}
    assert got == {row["path"]: set(row["labels"].split()) for row in rows}
    prepare(tmp_path / "prepared-new", **sections("prepare", input=exported, val_fraction=0.0, test_fraction=0.0),
            progress=False)
    assert len((tmp_path / "prepared-new" / "train.lst").read_text().splitlines()) == 6


def test_the_labelling_page_makes_a_choice_within_an_exclusive_group(tmp_path, browser):
    """#53: with an exclusive group (colour: one per photo), choosing a colour clears the one the model chose; a
    label outside the group still toggles alone."""
    from PIL import Image

    from mltag.tools.suggest import label_page

    labels = ["red", "green", "blue", "shoe", "bag"]
    files = []
    for i in range(2):
        f = tmp_path / f"{i}.jpg"
        Image.new("RGB", (16, 16), (200, 20, 20)).save(f)
        files.append(f)
    scores = np.array([[0.2, 0.7, 0.1, 0.9, 0.2], [0.8, 0.1, 0.1, 0.1, 0.9]])
    chosen = np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 1]], bool)
    page_file = tmp_path / "suggest.html"
    page_file.write_text(label_page(files, labels, scores, chosen, str(tmp_path), "k",
                                    groups=[["red", "green", "blue"], ["shoe", "bag"]]))
    page = browser.new_page()
    page.goto(page_file.as_uri())

    def checked():
        return page.eval_on_selector_all("#toggles input", "els => els.filter(e => e.checked).map(e => e.dataset.label)")

    assert checked() == ["green", "shoe"]
    assert "choosing one clears the others" in page.content()
    page.keyboard.press("1")  # red: replaces green
    assert checked() == ["red", "shoe"]
    page.keyboard.press("5")  # bag: replaces shoe (its group)
    assert checked() == ["red", "bag"]
    page.keyboard.press("1")  # red again: unchecked, the photo may be left without (a person decides)
    assert checked() == ["bag"]
    page.close()
