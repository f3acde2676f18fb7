"""`pip install mltag` fits beside what a user has: pyproject.toml lists compatible ranges, and the lock files pin
the exact versions CI, `make install` and the image use, inside those ranges (#54)."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement

from conftest import REPO


def _locked(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[m[1].lower().replace("_", "-")] = m[2]
    return pins


def test_the_library_lists_ranges_and_the_lock_files_pin_inside_them():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = project["dependencies"] + project["optional-dependencies"]["kubeflow"] + \
        project["optional-dependencies"]["dvc"]
    locked = _locked("requirements.lock")
    for spec in runtime:
        req = Requirement(spec)
        assert not any(s.operator == "==" for s in req.specifier), f"{spec}: an exact pin conflicts with users' envs"
        assert req.specifier, f"{spec}: no range at all"
        name = req.name.lower().replace("_", "-")
        assert name in locked, f"{name} is not in requirements.lock"
        assert req.specifier.contains(locked[name], prereleases=True), (spec, locked[name])
