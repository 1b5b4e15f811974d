"""The README's two commands are what a new user runs; CI must run the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_runs_the_pipeline_then_the_tests():
    setup_and_run, setup_and_test = _quick_start_commands()[:2]
    assert setup_and_run.endswith("dvc repro")
    assert "requirements.lock" in setup_and_run
    assert setup_and_test.endswith("pytest")
    assert "requirements.lock" in setup_and_test


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci/run").read_text().splitlines()
    assert _quick_start_commands()[1] in ci_lines
