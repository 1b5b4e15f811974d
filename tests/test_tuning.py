"""visionpipe tune's grid, budget, front and winner (tasks/tuning.py); the search itself runs
in tests/test_e2e.py on a real pipeline."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from tasks import tuning as t
from tasks.params import DistillParams

ROWS = {  # name: (val macro-F1 int8, latency ms b1, int8 bytes)
    "a": (0.90, 1.0, 200_000),
    "b": (0.85, 0.5, 100_000),
    "c": (0.80, 0.6, 120_000),  # dominated by b: worse, slower, larger
    "d": (0.95, 3.0, 900_000),
    "e": (0.90, 1.1, 199_998),  # a's network quantized otherwise: 2 bytes smaller, no better
}


def rows(**changes) -> list[t.Row]:
    made = []
    for name, (f1, latency, size) in ROWS.items():
        candidate = t.Candidate("cnn", width=len(made) + 16)
        row = t.Row.of(candidate, "ptq", "ok", val_f1_macro_int8=f1, latency_ms_b1=latency,
                       int8_bytes=size, **changes)  # fmt: skip
        row.candidate = name
        made.append(row)
    return made


def by_name(made: list[t.Row]) -> dict[str, t.Row]:
    return {row.candidate: row for row in made}


def test_the_grid_is_fixed_and_each_candidate_is_a_valid_distill_section() -> None:
    space = t.search_space(96)
    assert space == t.search_space(96)  # a grid, not a draw
    names = [c.name for c in space]
    assert len(names) == len(set(names)) == 6 * 2 + 5
    assert {c.input_size for c in space if c.model == t.TRUNK} == {96, 64}
    assert [c.name for c in t.search_space(32)][:2] == ["trunk3-32px", "trunk4-32px"]  # one size
    assert [c.name for c in t.search_space(96, ["cnn", "mobilenet"])] == [
        "mobilenet-w16", "mobilenet-w24", "mobilenet-w32", "cnn-w16", "cnn-w32"]  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown student families \['vit'\]"):
        t.search_space(96, ["trunk", "vit"])
    params = yaml.safe_load(Path("params.yaml").read_text())["distill"]
    for candidate in space:
        changed = {k.split(".", 1)[1]: v for k, v in candidate.overrides().items()}
        student = DistillParams.model_validate(
            {**params, **changed}
        )  # pretrained only where it can be
        assert student.model == candidate.model


def test_the_front_keeps_only_the_undominated_and_the_winner_is_the_best_within_budget() -> None:
    made = rows()
    t.mark_front(made)
    assert {n for n, r in by_name(made).items() if r.on_front} == {"a", "b", "d"}  # e: same KB
    budget = t.Budget(max_bytes=500_000, max_latency_ms_b1=2.0, latency_from="test")
    assert t.choose(made, budget).candidate == "a"  # d scores more but is over both limits
    assert {n for n, r in by_name(made).items() if r.within_budget} == {"a", "b", "c", "e"}
    assert [r.candidate for r in made if r.winner] == ["a"]

    tight = rows()
    assert t.choose(tight, t.Budget(150_000, 2.0, "test")).candidate == "b"
    assert t.choose(rows(), t.Budget(50_000, 2.0, "test")) is None


def test_failed_and_pruned_rows_are_neither_on_the_front_nor_chosen() -> None:
    made = rows()
    made[3].status = "failed"
    t.mark_front(made)
    assert not made[3].on_front
    assert t.choose(made, t.Budget(10**9, 10.0, "test")).candidate == "a"


def test_an_impossible_budget_names_the_smallest_and_the_fastest() -> None:
    message = t.impossible_budget(rows(), t.Budget(50_000, 0.1, "--max-latency-ms"))
    assert "50.0 KB and 0.100 ms" in message
    assert "the smallest measured, b-ptq, is 100.0 KB at 0.500 ms" in message
    assert "the fastest, b-ptq" in message and "Raise --max-kb or --max-latency-ms" in message
    assert t.impossible_budget([], t.Budget(1, 1.0, "x")) == "no candidate could be measured"


def test_pruning_is_exact_on_size_and_leaves_a_margin_for_timing_noise() -> None:
    budget = t.Budget(max_bytes=100, max_latency_ms_b1=1.0, latency_from="test")
    assert budget.hopeless(101, 0.5)
    assert not budget.hopeless(100, 1.0 * t.PRUNE_LATENCY_MARGIN)
    assert budget.hopeless(100, 1.01 * t.PRUNE_LATENCY_MARGIN)
    assert not budget.fits(100, 1.1)  # but the verdict after training has no margin


@pytest.mark.parametrize(
    ("trials", "picked"), [(1, [5]), (2, [0, 5]), (3, [0, 2, 5]), (9, range(6))]
)
def test_trials_are_spread_over_the_latency_range(trials, picked) -> None:
    candidates = [t.Candidate("cnn", width=w) for w in (8, 16, 24, 32, 40, 48)]
    latency = {c.name: float(c.width) for c in reversed(candidates)}
    assert t.spread(candidates, latency, trials) == [candidates[i] for i in picked]


def test_the_winner_becomes_dvc_exp_set_arguments_and_a_git_safe_name() -> None:
    row = t.Row.of(t.Candidate(t.TRUNK, trunk_blocks=7, input_size=64), "qat", "ok")
    assert t.set_args(row) == [
        "distill.model=efficientnet_lite0_trunk", "distill.pretrained=true",
        "distill.trunk_blocks=7", "distill.input_size=64", "quantize.method=qat",
    ]  # fmt: skip
    assert t.experiment_name(row) == "tune-trunk7-64px-qat"


def test_the_csv_and_the_plot_are_written(tmp_path) -> None:
    made = rows()
    made.append(t.Row.of(t.Candidate("mobilenet", width=32), "", "pruned", int8_bytes=5, note="x"))
    t.mark_front(made)
    budget = t.Budget(500_000, 2.0, "test")
    t.choose(made, budget)
    written = list(csv.DictReader(t.write_csv(tmp_path / "pareto.csv", made).open()))
    assert [r["candidate"] for r in written] == ["a", "b", "c", "d", "e", "mobilenet-w32"]
    assert written[0]["winner"] == "True" and written[5]["status"] == "pruned"
    assert written[5]["val_f1_macro_int8"] == ""  # never measured, not a zero
    png = t.plot_front(tmp_path / "pareto.png", made, budget, "test")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_search_keeps_its_records_and_sizing_and_a_new_key_starts_afresh(
    tmp_path,
) -> None:
    from flows.tune import fresh_state, size_and_speed

    candidates = fresh_state(tmp_path, "key-1")
    (candidates / "cnn-w16").mkdir()
    (candidates / "cnn-w16" / "record.json").write_text("{}")
    saved = candidates / "sized.json"
    saved.write_text('{"teacher_ms": 2.0, "sized": {"cnn-w16": [30000, 0.25]}}')
    untrained = {"cnn-w16": candidates / "cnn-w16" / "untrained_int8.onnx"}
    # the same architectures: the saved sizing, nothing timed (no teacher is even needed)
    assert size_and_speed(saved, None, untrained, None, None) == (2.0, {"cnn-w16": (30000, 0.25)})

    assert fresh_state(tmp_path, "key-1") == candidates
    assert (candidates / "cnn-w16" / "record.json").exists()  # same key: resumed
    fresh_state(tmp_path, "key-2")
    assert not (candidates / "cnn-w16").exists() and not saved.exists()  # new key: afresh


def test_each_candidate_becomes_a_validated_distill_section() -> None:
    from flows.tune import candidate_params
    from tasks.params import load_params

    distill = load_params().distill
    student = candidate_params(distill, t.Candidate("mobilenet", width=24))
    assert (student.model, student.width, student.pretrained) == ("mobilenet", 24, False)
    assert student.temperature == distill.temperature  # the rest as params.yaml has it
    deeper = candidate_params(distill, t.Candidate(t.TRUNK, trunk_blocks=8, input_size=64))
    assert (deeper.trunk_blocks, deeper.input_size, deeper.pretrained) == (8, 64, True)
