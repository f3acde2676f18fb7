"""Never destroy what the user points at: an output replaces only what mltag wrote, and a label never
becomes a path."""

from __future__ import annotations

import os

import pytest

from conftest import make_colour_dataset, write_lst_dataset
from mltag.errors import MltagError
from mltag.files import atomic_path, write_text_atomic


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("given", ["folder", "all.lst"])
def test_prepare_into_its_own_dataset_folder_is_refused_and_the_dataset_is_untouched(tmp_path, given):
    from mltag.config import sections
    from mltag.steps.prepare import prepare

    data = tmp_path / "data"
    write_lst_dataset(data, make_colour_dataset(data, n=24))
    before = _tree(data)
    source = data if given == "folder" else data / "all.lst"
    with pytest.raises(MltagError, match=r"is a folder that mltag did not write .*\(nothing was touched\)"):
        prepare(data, **sections("prepare", input=str(source)), progress=False)
    assert _tree(data) == before


def test_a_file_output_never_replaces_a_folder_of_files_or_an_mltag_folder(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "a.jpg").write_bytes(b"x")
    with pytest.raises(MltagError, match="is a folder that mltag did not write \\(1 entries: a.jpg\\)"):
        write_text_atomic(mine, "predictions\n")
    model = tmp_path / "models" / "train"
    model.mkdir(parents=True)
    (model / "model.json").write_text("{}")
    with pytest.raises(MltagError, match="is a folder, and this output is a file"):
        write_text_atomic(model, "{}")
    assert (mine / "a.jpg").read_bytes() == b"x" and (model / "model.json").read_text() == "{}"


def test_a_pipe_is_refused_and_a_symlink_is_written_through(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(MltagError, match="is a named pipe"):
        write_text_atomic(fifo, "x")
    assert fifo.is_fifo()
    real = tmp_path / "real" / "out.csv"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    write_text_atomic(link, "new\n")
    assert link.is_symlink() and real.read_text() == "new\n"


def test_an_mltag_folder_and_a_folder_of_its_own_pattern_are_replaced(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "dataset.json").write_text("{}")
    (out / "train.lst").write_text("")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "dataset.json").write_text('{"new": 1}')
    assert _tree(out) == ["dataset.json"]
    pr = tmp_path / "pr"
    pr.mkdir()
    (pr / "old label.csv").write_text("precision,recall,threshold\n")
    with atomic_path(pr, also=("*.csv",)) as tmp:
        tmp.mkdir()
        (tmp / "sea.csv").write_text("precision,recall,threshold\n")
    assert _tree(pr) == ["sea.csv"]
    # mltag drift's folder (drift.json, drift.html): a second run into its default reports/drift replaces it (#51)
    drift = tmp_path / "drift"
    for run in (1, 2):
        with atomic_path(drift) as tmp:
            tmp.mkdir()
            (tmp / "drift.json").write_text(f'{{"run": {run}}}')
            (tmp / "drift.html").write_text("<html></html>")
    assert (drift / "drift.json").read_text() == '{"run": 2}'


@pytest.mark.parametrize("name", ["../../../../ESCAPED_LABEL", "desert & co", "<script>alert(1)</script>",
                                  'say "hi"', "a/b", ".hidden", "trailing."])
def test_a_label_that_could_become_a_path_or_that_mlflow_refuses_is_refused_at_prepare_naming_file_and_line(
        tmp_path, name):
    from mltag.config import sections
    from mltag.steps.prepare import prepare

    data = tmp_path / "data"
    write_lst_dataset(data, make_colour_dataset(data, n=24))
    (data / "labels.txt").write_text(f"red\n{name}\nblue\n")
    with pytest.raises(MltagError, match="cannot be used: a label becomes a file name and an MLflow metric name") as e:
        prepare(tmp_path / "prepared", **sections("prepare", input=str(data)), progress=False)
    assert str(e.value).startswith(f"{data / 'labels.txt'}:2: label name")
    assert not (tmp_path / "prepared").exists() and not list(tmp_path.parent.glob("ESCAPED_LABEL*"))


def test_a_class_folder_with_a_bad_name_is_refused_and_letters_of_any_script_are_fine(tmp_path):
    from PIL import Image

    from mltag.data.datasets import read_dataset

    for cls in ("café", "日本", "sea-side 2"):
        (tmp_path / "ok" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "ok" / cls / "1.jpg")
    assert sorted(read_dataset(tmp_path / "ok", "folders").labels) == sorted(["café", "日本", "sea-side 2"])
    (tmp_path / "bad" / "a&b").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "bad" / "a&b" / "1.jpg")
    with pytest.raises(MltagError, match="label name 'a&b' cannot be used.*for example to 'a_b'"):
        read_dataset(tmp_path / "bad", "folders")


@pytest.mark.parametrize("edit, message", [
    ({"thresholds": {"red": 5.0, "green": 0.5, "blue": 0.5}}, "label 'red' has threshold 5.0 \\(a threshold is a number in \\[0, 1\\]\\)"),
    ({"thresholds": {"red": -1, "green": 0.5, "blue": 0.5}}, "label 'red' has threshold -1"),
    ({"global_threshold": float("inf")}, "global_threshold is inf"),
    ({"thresholds": {"red": 0.5, "green": 0.5}}, "thresholds miss label\\(s\\) the model scores: blue"),
])
def test_an_edited_threshold_outside_0_1_or_a_missing_label_is_refused(tmp_path, edit, message):
    import json

    from mltag.data.formats import read_thresholds

    th = {"format": 1, "labels": ["red", "green", "blue"], "thresholds": {"red": 0.4, "green": 0.5, "blue": 0.6},
          "global_threshold": 0.5}
    th.update(edit)
    f = tmp_path / "thresholds.json"
    f.write_text(json.dumps(th))
    with pytest.raises(MltagError, match=message):
        read_thresholds(f, ["red", "green", "blue"])


def test_a_full_disk_during_a_folder_copy_reads_as_one_line():
    """shutil.copytree gathers each file's error into a list (no errno): the CLI turns it back into the first
    OSError, so the documented 'free some space' line is what a user sees, not 1,600 characters of tuples."""
    import errno
    import shutil

    from mltag.cli import _OS_HINTS, _first_copy_error

    many = shutil.Error([(f"/cache/bb/variables/v{i}", f"/out/model/backbone/variables/v{i}",
                          "[Errno 28] No space left on device") for i in range(40)])
    e = _first_copy_error(many)
    assert e.errno == errno.ENOSPC and _OS_HINTS[e.errno] == "free some space"
    assert e.filename == "/out/model/backbone/variables/v0" and "40 file(s)" in e.strerror and len(str(e)) < 200
    other = shutil.Error([("a", "b", "something else")])
    assert _first_copy_error(other) is other


def test_leftovers_of_another_machine_on_a_shared_volume_are_judged_by_age_not_by_pid(tmp_path, monkeypatch):
    """Temp names carry pid@host: a dead local PID's leftover goes at once; another node's (a PVC shared by pods)
    is never judged by this node's process table, and goes only when untouched for FOREIGN_STALE_SECONDS."""
    import os
    import time

    from mltag import files

    monkeypatch.setattr(files, "_CLEANED", set())
    dead = 2 ** 22 + 7  # above pid_max's default: no live process has it
    other = "0123abcd" if files.HOST_ID != "0123abcd" else "fedc3210"
    mine = tmp_path / f".bn.{dead}@{files.HOST_ID}.x1.tmp"
    theirs_new = tmp_path / f".bn.{dead}@{other}.x2.tmp"
    theirs_old = tmp_path / f".bn.old-{dead}@{other}"
    legacy = tmp_path / f".bn.{dead}.x3.tmp"  # named before host ids: judged by PID as before
    for p in (mine, theirs_new, theirs_old, legacy):
        p.mkdir()
    hour_ago, two_days_ago = time.time() - 3600, time.time() - 2 * 86400
    for p, t in ((mine, hour_ago), (theirs_new, hour_ago), (theirs_old, two_days_ago), (legacy, hour_ago)):
        os.utime(p, (t, t))
    assert files.process_token() == f"{os.getpid()}@{files.HOST_ID}"
    assert files.remove_stale_leftovers(tmp_path, "bn") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [theirs_new.name]


def test_an_output_folder_another_process_renames_into_place_first_is_one_clear_line(tmp_path, monkeypatch):
    """Two pods writing one output folder on a shared volume (the swap's lock is per machine): the one whose
    rename finds the other's complete folder already there says so in one line, and the other's output stays."""
    from mltag import files
    from mltag.errors import MltagError

    dest = tmp_path / "out"
    real = os.replace

    def raced(src, dst):  # the other pod's complete output lands first
        if str(dst) == str(dest) and not dest.exists():
            dest.mkdir()
            (dest / "theirs.txt").write_text("complete")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", raced)
    with pytest.raises(MltagError, match="another run wrote this output at the same moment"):
        with files.atomic_path(dest) as tmp:
            tmp.mkdir()
            (tmp / "mine.txt").write_text("complete")
    assert sorted(p.name for p in dest.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind
