"""`mltag doctor`: one line per check, exit 2 when a run would fail (a dead tracking server, an
unwritable vector store), and within seconds."""

from __future__ import annotations

import time

from conftest import free_port, run_cli


def _project(tmp_path, fake_backbone, store):
    (tmp_path / "params.yaml").write_text(f"backbone:\n  handle: {fake_backbone}\nbottleneck:\n  cache_dir: {store}\n")
    return tmp_path


def test_doctor_on_a_healthy_project_says_what_the_machine_can_do(tmp_path, fake_backbone):
    project = _project(tmp_path, fake_backbone, tmp_path / "store")
    p = run_cli("doctor", cwd=project, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "mltag doctor" and lines[-1].startswith("doctor: a run should work")
    checks = {ln.split()[1]: ln.split()[0] for ln in lines[1:-1]}
    assert set(checks) >= {"packages", "cpu", "engines", "forward", "gpu", "tracking", "store", "outputs", "backbones",
                           "dvc"}
    assert "FAIL" not in checks.values()
    assert "AVX2" in p.stdout and "tensorflow 2." in p.stdout and "bottleneck LiteRT" in p.stdout


def test_doctor_with_a_dead_tracking_server_and_an_unwritable_store_exits_2(tmp_path, fake_backbone):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the vector store's folder must be\n")
    project = _project(tmp_path, fake_backbone, blocker / "store")
    uri = f"http://user:pw-secret@127.0.0.1:{free_port()}"
    t0 = time.time()
    p = run_cli("doctor", "--no-measure", cwd=project, env={"MLFLOW_TRACKING_URI": uri}, check=False)
    assert time.time() - t0 < 30
    assert p.returncode == 2, p.stdout + p.stderr
    failed = [ln for ln in p.stdout.splitlines() if ln.lstrip().startswith("FAIL")]
    assert len(failed) == 2, p.stdout
    assert "tracking" in failed[0] and "http://127.0.0.1:" in failed[0] and "does not answer" in failed[0]
    assert "store" in failed[1] and str(blocker) in failed[1] and "is a file, not a folder" in failed[1]
    assert "pw-secret" not in p.stdout + p.stderr and "user" not in failed[0]
    assert "2 problem(s) that would make a run fail" in p.stdout.splitlines()[-1]
    assert "Traceback" not in p.stderr


def test_doctor_names_a_bad_params_file_and_still_checks_the_rest(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  learning_rat: 0.1\n")
    p = run_cli("doctor", "--no-measure", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
                check=False)
    assert p.returncode == 2 and "FAIL  params" in p.stdout and "learning_rat" in p.stdout, p.stdout
    assert "ok    cpu" in p.stdout
