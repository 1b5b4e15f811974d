"""`dvc repro prepare` follows the content of a DVC-tracked ImageFolder: edit, add, remove.

A real local Prefect server (started the way a stage starts one) and a fresh
copy of the repository; only the prepare stage runs, five times.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from benchmarks.pipeline import stages_ran
from benchmarks.workspace import copy_env, fresh_copy, git
from tasks.servers import local_server_url, start_local_server, stop_local_server
from tests.imagefolders import noise
from tests.tinyrepo import set_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real local Prefect server, started the way a stage starts one, stopped afterwards."""
    state = tmp_path_factory.mktemp("prefect-state")
    url = start_local_server(state)
    yield url, state
    assert stop_local_server(state)
    assert local_server_url(state) is None


def _dvc(repo: Path, env: dict, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _stage_env(url: str, state: Path) -> dict[str, str]:
    return copy_env(state, PREFECT_API_URL=url)


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise((10, 10, 3), seed)).save(path)


def test_prepare_follows_the_content_of_a_dvc_tracked_image_folder(prefect_api, tmp_path):
    repo = fresh_copy(tmp_path / "repo")
    env = _stage_env(*prefect_api)
    folder = repo / "data/raw/shapes"
    for i in range(36):
        _image(folder / f"class{i % 3}" / f"{i}.png", seed=i)
    set_params(repo, {"data": {"source": "data/raw/shapes", "image_size": 8}})
    _dvc(repo, env, "add", "data/raw/shapes")
    assert "/shapes" in (repo / "data/raw/.gitignore").read_text().split()
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "track shapes with DVC")

    def prepared_images() -> int:
        return json.loads((repo / "metrics/prepare.json").read_text())["images"]

    def raw_md5() -> str:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        return next(d["md5"] for d in lock["stages"]["prepare"]["deps"] if d["path"] == "data/raw")

    assert stages_ran(_dvc(repo, env, "repro", "prepare")) == ["audit", "prepare"]
    assert prepared_images() == 36
    assert json.loads((repo / "reports/data_quality.json").read_text())["content_versioned"]
    first = raw_md5()
    assert stages_ran(_dvc(repo, env, "repro", "prepare")) == []  # nothing changed: a no-op

    _image(folder / "class1/1.png", seed=1000)  # edit one image
    assert "data/raw" in _dvc(repo, env, "status", "prepare")
    assert stages_ran(_dvc(repo, env, "repro", "prepare")) == ["audit", "prepare"]
    edited = raw_md5()
    assert edited != first

    _image(folder / "class2/new.png", seed=2000)  # add one
    assert stages_ran(_dvc(repo, env, "repro", "prepare")) == ["audit", "prepare"]
    assert prepared_images() == 37

    (folder / "class0/0.png").unlink()  # remove one
    assert stages_ran(_dvc(repo, env, "repro", "prepare")) == ["audit", "prepare"]
    assert prepared_images() == 36
    assert raw_md5() not in (first, edited)
    assert stages_ran(_dvc(repo, env, "repro", "prepare")) == []
