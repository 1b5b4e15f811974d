"""dvc.yaml is the contract other tools rely on: exact code deps, params keys, declared outputs."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from flows.prefect_api import flow_sections
from tasks import layout
from tasks.params import load_params

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = ("audit", "prepare", "resample", "train", "distill", "quantize", "evaluate")
# How a stage reaches Prefect cannot change an output, so these are deliberately not deps.
NOT_DEPS = {
    "flows/prefect_api.py",
    "tasks/servers.py",
    "tasks/orchestration.py",
}  # nor is a package's __init__.py: a docstring
# Params that change how fast a stage runs, never what it writes: left out of dvc.yaml
# so that changing them does not re-run anything.
NOT_OUTPUT_PARAMS = {"data.workers"}
# Keys of a section that a stage's flow receives but never reads, by stage. The audit
# runs before the split (so not the split's keys) and does not group (prepare does);
# prepare reads only the audit's grouping switch and the exclude list.
NOT_READ = {
    "audit": {
        "data.min_per_class", "data.val_fraction", "data.test_fraction",
        "data.imbalance_ratio", "audit.split_groups",
    },
    "prepare": {
        f"audit.{key}" for key in yaml.safe_load((ROOT / "params.yaml").read_text())["audit"]
    } - {"audit.split_groups", "audit.exclude"},
}  # fmt: skip


def _module_file(name: str) -> Path | None:
    """The project file for a dotted module name, None for anything outside flows/ and tasks/."""
    parts = name.split(".")
    if parts[0] not in ("flows", "tasks"):
        return None
    candidate = ROOT.joinpath(*parts).with_suffix(".py")
    return candidate if candidate.is_file() else ROOT.joinpath(*parts, "__init__.py")


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The absolute name of the module a ``from`` import names (relative ones included)."""
    if not node.level:
        return str(node.module)
    package = path.relative_to(ROOT).with_suffix("").parts[: -node.level]
    return ".".join([*package, *([node.module] if node.module else [])])


def _project_modules_imported_by(module: str) -> set[str]:
    """Project files ``module`` imports, transitively, read from the import statements.

    Static analysis is exact here because the project has no dynamic imports,
    and it costs milliseconds where importing torch/mlflow/prefect costs seconds.
    """
    seen: set[Path] = set()
    pending = [_module_file(module)]
    while pending:
        path = pending.pop()
        if path is None or path in seen or not path.is_file():
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        # Imports under `if TYPE_CHECKING:` never run, so they are not deps.
        type_only = {
            id(child)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for child in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                pending += [_module_file(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or node.level):
                name = _absolute(node, path)
                pending.append(_module_file(name))
                # `from tasks.training import train` imports the submodule tasks.training.train
                pending += [_module_file(f"{name}.{alias.name}") for alias in node.names]
    return {str(p.relative_to(ROOT)) for p in seen}


def test_every_stage_runs_its_prefect_flow():
    assert tuple(DVC["stages"]) == STAGES
    for name, stage in DVC["stages"].items():
        assert stage["cmd"] == f"python -m flows.{name}"


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_the_modules_the_flow_imports(stage):
    declared = {d for d in DVC["stages"][stage]["deps"] if d.endswith(".py")}
    imported = {
        path
        for path in _project_modules_imported_by(f"flows.{stage}") - NOT_DEPS
        if not path.endswith("__init__.py")
    }
    assert declared == imported


def test_package_inits_hold_only_a_docstring():
    # which is why no __init__.py is a dep: it cannot change an output
    inits = [*ROOT.glob("flows/__init__.py"), *ROOT.glob("tasks/**/__init__.py")]
    assert len(inits) >= 7
    for path in inits:
        body = ast.parse(path.read_text()).body
        assert [type(node) for node in body] == [ast.Expr], path


@pytest.mark.parametrize("stage", STAGES)
def test_params_keys_are_the_sections_the_flow_reads(stage):
    flow = getattr(importlib.import_module(f"flows.{stage}"), f"{stage}_flow")
    declared = {key.split(".")[0] for key in DVC["stages"][stage]["params"]}
    assert declared == set(flow_sections(flow))


@pytest.mark.parametrize("stage", STAGES)
def test_a_section_listed_key_by_key_lists_every_key_that_can_change_an_output(stage):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    keys = DVC["stages"][stage]["params"]
    for section in {key.split(".")[0] for key in keys if "." in key}:
        expected = {f"{section}.{name}" for name in raw[section]} - NOT_OUTPUT_PARAMS
        expected -= NOT_READ.get(stage, set())
        assert {key for key in keys if key.startswith(f"{section}.")} == expected


def test_prepare_depends_on_the_raw_data_folder():
    from tasks.data.prepare import RAW_DATA_DIR

    assert str(RAW_DATA_DIR) in DVC["stages"]["prepare"]["deps"]
    assert (ROOT / RAW_DATA_DIR / "README.md").is_file()  # so a fresh clone has the folder


def test_params_keys_exist_in_params_yaml():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage in DVC["stages"].values():
        for key in stage["params"]:
            node = raw
            for part in key.split("."):
                assert part in node, f"{key} is not in params.yaml"
                node = node[part]


def test_declared_outputs_match_the_code_layout():
    outs = set()
    for stage in DVC["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                outs.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    expected = {
        layout.PREPARED_DIR, layout.RESAMPLED_DIR, layout.TEACHER, layout.TEACHER_ONNX,
        layout.STUDENT, layout.STUDENT_FP32_ONNX, layout.STUDENT_INT8, layout.DATA_QUALITY,
        layout.CONFUSION_DIR, layout.EVALUATION_DIR, layout.AUDIT_DIR, layout.AUDIT_REPORT,
        layout.AUDIT_GALLERY_DIR,
        *(layout.metrics_path(s) for s in STAGES),
        layout.curve_path("train"), layout.curve_path("distill"),
    }  # fmt: skip
    assert {Path(o) for o in outs} == expected


def test_the_committed_params_validate():
    load_params(ROOT / "params.yaml")
