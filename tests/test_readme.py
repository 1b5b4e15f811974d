"""The README's two commands are what a new user runs; CI must run the second one verbatim.

The README, docs/ and benchmarks/README.md must also stay true to the repository: every
relative link reaches a file (and a heading, for an #anchor), every script, module and
`visionpipe` subcommand their commands name exists, and the README stays a short front door.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]
README_MAX_LINES = 260

FENCE = re.compile(r"^(`{3,}|~{3,})[ \t]*(\S*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*(?:\n[^`\n]*)*?`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
SCRIPT = re.compile(r"\bpython3?[ \t]+(benchmarks/[\w./-]+\.py)\b")
MODULE = re.compile(r"\b(?:python3?|torchrun)\b[^\n#]*?[ \t]-m[ \t]+([A-Za-z_][\w.]*)")
REPO_PATH = re.compile(r"(?<![\w./-])(benchmarks/[\w./-]*\w)")
SUBCOMMAND = re.compile(r"(?<![\w./-])visionpipe[ \t]+([a-z][\w-]*)")


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


def _split(page: Path) -> tuple[str, list[tuple[str, str]]]:
    """A page's prose (fenced blocks blanked out) and its fenced blocks as (language, text)."""
    text = page.read_text()
    blocks = [(m.group(2), m.group(3)) for m in FENCE.finditer(text)]
    return FENCE.sub("", text), blocks


def _bash(page: Path) -> str:
    return "\n".join(body for language, body in _split(page)[1] if language == "bash")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(_split(page)[0]):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_the_slug_is_githubs():
    assert github_slug("The defaults on four kinds of data (`suite.py`)") == (
        "the-defaults-on-four-kinds-of-data-suitepy"
    )
    assert github_slug("Fashion-MNIST, ratio 100") == "fashion-mnist-ratio-100"
    assert github_slug("`metrics/distill.json`") == "metricsdistilljson"


def test_the_pages_exist():
    assert all(page.is_file() for page in PAGES)
    assert len(PAGES) >= 8  # the README, benchmarks/README.md and the docs pages


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(page: Path):
    prose = INLINE_CODE.sub("", _split(page)[0])
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading in {resolved.name} has the anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_pages_do_link_to_each_other():
    """Guards the link test against passing on nothing: the README links into docs/."""
    targets = LINK.findall(_split(ROOT / "README.md")[0])
    assert any(target.startswith("docs/") for target in targets)
    assert "benchmarks/README.md" in targets


def _module_exists(name: str) -> bool:
    parts = name.split(".")
    path = ROOT.joinpath(*parts)
    if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
        return True
    if (ROOT / parts[0]).is_dir() or (ROOT / f"{parts[0]}.py").is_file():
        return False  # one of the repository's packages: the module must be a file in it
    return importlib.util.find_spec(name) is not None  # the standard library's venv, pip


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_the_scripts_modules_and_files_the_commands_name_exist(page: Path):
    bash = _bash(page)
    missing = [script for script in SCRIPT.findall(bash) if not (ROOT / script).is_file()]
    missing += [f"-m {module}" for module in MODULE.findall(bash) if not _module_exists(module)]
    missing += [path for path in REPO_PATH.findall(bash) if not (ROOT / path).exists()]
    assert not missing, f"{page.relative_to(ROOT)} runs what the repository lacks: {missing}"


def test_the_commands_are_found():
    bash = "\n".join(_bash(page) for page in PAGES)
    assert "benchmarks/suite.py" in SCRIPT.findall(bash)
    assert {"flows.retrain", "flows.train", "venv"} <= set(MODULE.findall(bash))
    assert not _module_exists("flows.no_such_stage")


def cli_subcommands() -> set[str]:
    """The names flows/cli.py gives ``add_parser``, read without importing it."""
    tree = ast.parse((ROOT / "flows/cli.py").read_text())
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_parser"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }


def mentioned_subcommands(page: Path) -> set[str]:
    """`visionpipe <word>` in bash blocks, in `$ ` lines of other blocks, and in inline code."""
    prose, blocks = _split(page)
    lines = [
        line
        for language, body in blocks
        for line in body.splitlines()
        if language == "bash" or line.startswith("$ ")
    ]
    lines += [" ".join(span.strip("`").split()) for span in INLINE_CODE.findall(prose)]
    return {word for line in lines for word in SUBCOMMAND.findall(line)}


def test_the_cli_has_subcommands():
    expected = {"check", "compare", "predict", "status", "up", "down", "deploy"}
    assert expected | {"serve-model", "serve-deployment", "serve"} <= cli_subcommands()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_visionpipe_subcommand_mentioned_exists(page: Path):
    unknown = mentioned_subcommands(page) - cli_subcommands()
    assert not unknown, f"{page.relative_to(ROOT)} mentions `visionpipe {sorted(unknown)}`"


def test_the_subcommands_are_found():
    mentioned = set().union(*(mentioned_subcommands(page) for page in PAGES))
    assert {"predict", "up", "serve-deployment", "serve-model", "deploy", "compare"} <= mentioned


def test_the_readme_is_a_short_front_door():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"
