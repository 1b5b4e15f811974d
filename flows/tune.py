"""tune: search students within a deployment budget; queue the winner as a DVC experiment.

Run: ``visionpipe tune --max-kb K --max-latency-ms L [--trials N]`` after ``dvc repro``
(it distils from the pipeline's teacher, ``models/teacher.pt``). Not a DVC stage: it
proposes a student, and ``dvc exp`` runs the pipeline with it.

1. **Size up** every architecture of the grid (``tasks/tuning.py``) untrained: export,
   PTQ and time its int8 model beside the teacher's fp32 runtimes, interleaved in
   one process with ``evaluate.num_threads`` threads, as the evaluate stage times
   them. One over the budget is pruned before it costs a fit (its graph, and so its
   size and speed, do not depend on its weights).
2. **Fit** up to ``--trials`` of the rest, spread over their latency range: each is
   distilled with the ``distill`` params of ``params.yaml`` (its architecture
   changed), then quantized both ways (PTQ, and QAT from the same fit), each scored
   on val. Each fit is an MLflow child run of one ``tune`` parent run.
3. **Time** every fitted int8 model again, with the teacher, in one interleaved
   measurement; mark the budget, the Pareto front (val macro-F1, latency, size) and
   the winner: the best int8 val macro-F1 within the budget. Test is never looked at.
4. **Write** ``reports/tune/pareto.csv``, ``pareto.png`` and ``tune.json``, and queue the
   winner: ``dvc exp run --queue --name tune-<winner> -S ...``. ``dvc queue start``
   (or ``dvc exp run --run-all``) runs it: distill, quantize and evaluate, which
   measures its test score; ``dvc exp apply`` makes it the pipeline's student.

An interrupted search resumes: each finished candidate's record lives under
``reports/tune/candidates/`` (and a fit in progress resumes per epoch), keyed by
the teacher, the data and the params; a change to any of them starts afresh.
A candidate whose fit or quantization fails is recorded as failed, and the
search goes on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from prefect import flow, get_run_logger

from flows.distill import run_parameters
from flows.fitting import resumable
from tasks import tracking
from tasks import tuning as t
from tasks.artifacts import write_json
from tasks.checkpoints import Checkpoint, load_checkpoint
from tasks.data.pixels import normalise
from tasks.efficientnet import auto_input_size
from tasks.evaluation.latency import Latency, fastest, measure_runtimes, tile_batch
from tasks.export import quantize as q
from tasks.export.onnx_io import export_checkpoint, export_onnx, torch_logits
from tasks.inference import onnx_logits, onnx_session
from tasks.layout import PREPARED_DIR, TEACHER, TEACHER_ONNX
from tasks.orchestration import stage_task
from tasks.params import (
    AugmentParams,
    DistillParams,
    EvaluateParams,
    MlflowParams,
    QuantizeParams,
)
from tasks.serving.predict import file_md5
from tasks.training import distill as d
from tasks.training.inputs import TrainingData, load_training_data, network_for
from tasks.training.outputs import write_model
from tasks.training.resume import fingerprint

OUT_DIR = Path("reports/tune")
PRECHECK_CALIBRATION = 64  # train images calibrating an untrained network's int8 export
TEACHER_KEYS = (("teacher", "torch"), ("teacher", "onnxruntime"))


def candidate_params(distill: DistillParams, candidate: t.Candidate) -> DistillParams:
    """``distill`` with the candidate's architecture (validated as params.yaml would be)."""
    changes = {key.split(".", 1)[1]: value for key, value in candidate.overrides().items()}
    return DistillParams.model_validate({**distill.model_dump(), **changes})


def _teacher_runtimes(teacher: Checkpoint, batch: np.ndarray, threads: int) -> dict:
    model = teacher.build()
    session = onnx_session(TEACHER_ONNX, threads)
    images = normalise(batch, teacher.stats)
    return {
        TEACHER_KEYS[0]: (lambda x: torch_logits(model, x, batch_size=len(x)), images),
        TEACHER_KEYS[1]: (lambda x: onnx_logits(session, x, batch_size=len(x)), images),
    }


def _int8_runtime(path: Path, stats: Any, batch: np.ndarray, threads: int) -> tuple:
    session = onnx_session(path, threads)
    return (lambda x: onnx_logits(session, x, batch_size=len(x)), normalise(batch, stats))


def time_models(
    teacher: Checkpoint, int8: dict[str, Path], batch: np.ndarray, evaluate: EvaluateParams
) -> tuple[Latency, dict[str, Latency]]:
    """The teacher's fastest fp32 runtime at batch 1, and every int8 model, timed in the
    same interleaved rounds (``tasks/evaluation/latency.py``)."""
    torch.set_num_threads(evaluate.num_threads)
    threads = evaluate.num_threads
    runtimes = _teacher_runtimes(teacher, batch, threads)
    runtimes |= {
        name: _int8_runtime(path, teacher.stats, batch, threads) for name, path in int8.items()
    }
    measured = measure_runtimes(runtimes, evaluate.latency_warmup, evaluate.latency_repeats)
    by_runtime = {key[1]: measured[key] for key in TEACHER_KEYS}
    return by_runtime[fastest(by_runtime, batch=1)], {name: measured[name] for name in int8}


@stage_task(name="size-up")
def size_up(
    candidate: t.Candidate,
    data: TrainingData,
    distill: DistillParams,
    quantize: QuantizeParams,
    folder: Path,
) -> Path:
    """The candidate's untrained network as int8 ONNX (PTQ): its size and speed, before a fit."""
    int8 = folder / "untrained_int8.onnx"
    if int8.exists():
        return int8
    folder.mkdir(parents=True, exist_ok=True)
    params = candidate_params(distill, candidate)
    model = network_for(data, params, log=lambda _: None)
    height, _, channels = data.prepared.image_shape
    fp32 = export_onnx(model, (channels, height, height), folder / "untrained.onnx", {})
    images = data.prepared.train.images[:PRECHECK_CALIBRATION]
    calibration = normalise(np.asarray(images), data.prepared.stats)
    q.quantize_onnx.fn(fp32, int8, calibration, quantize, "ptq")
    fp32.unlink()
    return int8


@stage_task(name="fit-candidate")
def fit_candidate(
    candidate: t.Candidate,
    data: TrainingData,
    teacher: Checkpoint,
    params: tuple[int, DistillParams, AugmentParams, QuantizeParams],
    folder: Path,
    parent: tuple[str, str],
) -> tuple[list[t.Row], str]:
    """Distil the candidate from the teacher (an MLflow child run of ``parent``, its experiment
    and run ids), quantize it with PTQ and with QAT, and score each on val: its rows and its
    run's id, saved, so a resumed search skips it."""
    seed, distill, augment, quantize = params
    logger = get_run_logger()
    student = candidate_params(distill, candidate)
    run_params = run_parameters(seed, student, augment)
    started = time.perf_counter()
    with mlflow.start_run(
        experiment_id=parent[0], run_name=candidate.name, nested=True,
        parent_run_id=parent[1],  # explicit: a Prefect task may run in another thread
        tags={"stage": "tune", "variant": "candidate", "candidate": candidate.name},
    ) as child:  # fmt: skip
        run_id = child.info.run_id
        mlflow.log_params({key: str(value) for key, value in candidate.overrides().items()})

        def on_epoch(record) -> None:
            tracking.log_epoch(run_id, record)

        result = d.fit_student.fn(
            data, teacher, student, augment, seed, on_epoch,
            resumable(f"tune-{candidate.name}", run_params, data,
                      [teacher.mlflow_run_id, teacher.metrics]),
            logger.info,
        )  # fmt: skip
        checkpoint_path = folder / "student.pt"
        write_model(result, data, student, run_params, checkpoint_path, folder / "fit.json",
                    folder / "curve.csv", run_id)  # fmt: skip
        checkpoint = load_checkpoint(checkpoint_path)
        fp32 = export_checkpoint(checkpoint, folder / "student.onnx")
        calibration = q.calibration_set.fn(
            data.prepared.train, checkpoint, quantize.calibration_size, seed
        )
        q.quantize_onnx.fn(fp32, folder / "int8_ptq.onnx", calibration, quantize, "ptq")
        tuned = q.qat_student.fn(checkpoint, data.prepared.train, quantize, seed, folder)
        q.quantize_onnx.fn(tuned, folder / "int8_qat.onnx", calibration, quantize, "qat")
        seconds = time.perf_counter() - started
        rows = []
        for method in t.METHODS:
            path = folder / f"int8_{method}.onnx"
            check = q.check_int8.fn(checkpoint, path, data.prepared.val)
            rows.append(
                t.Row.of(
                    candidate,
                    method,
                    "ok",
                    params=int(checkpoint.metrics["params"]),
                    int8_bytes=path.stat().st_size,
                    val_f1_macro_fp32=check.val_f1_macro_fp32,
                    val_f1_macro_int8=check.val_f1_macro_int8,
                    fit_seconds=round(seconds, 1),
                )
            )
        mlflow.log_metrics(
            {"val_f1_macro_fp32": rows[0].val_f1_macro_fp32, "fit_seconds": seconds}
            | {f"{row.method}.val_f1_macro_int8": row.val_f1_macro_int8 for row in rows}
            | {f"{row.method}.int8_bytes": row.int8_bytes for row in rows}
        )
    write_json(folder / "record.json", {"rows": [asdict(row) for row in rows], "run_id": run_id})
    return rows, run_id


def size_and_speed(
    saved: Path,
    teacher: Checkpoint,
    untrained: dict[str, Path],
    batch: np.ndarray,
    evaluate: EvaluateParams,
) -> tuple[float, dict[str, tuple[int, float]]]:
    """The teacher's single-image ms, and each untrained int8 model's bytes and ms, timed
    together; saved, so that a resumed search prunes and picks the same candidates."""
    if saved.exists():
        record = json.loads(saved.read_text())
        if set(record["sized"]) == set(untrained):
            return record["teacher_ms"], {k: tuple(v) for k, v in record["sized"].items()}
    teacher_b1, timed = time_models(teacher, untrained, batch, evaluate)
    sized = {
        name: (path.stat().st_size, timed[name].latency_ms_b1) for name, path in untrained.items()
    }
    write_json(saved, {"teacher_ms": teacher_b1.latency_ms_b1, "sized": sized})
    return teacher_b1.latency_ms_b1, sized


def _saved(folder: Path) -> tuple[list[t.Row], str] | None:
    """What ``fit_candidate`` returned for this candidate in an earlier run, if it finished."""
    record = folder / "record.json"
    if not record.exists():
        return None
    saved = json.loads(record.read_text())
    return [t.Row(**row) for row in saved["rows"]], saved["run_id"]


def _failed(candidate: t.Candidate, exc: BaseException) -> t.Row:
    return t.Row.of(candidate, "", "failed", note=f"{type(exc).__name__}: {exc}"[:500])


def fresh_state(out_dir: Path, key: str) -> Path:
    """``out_dir/candidates``, emptied unless it was made for the same ``key``."""
    candidates = out_dir / "candidates"
    stamp = out_dir / "search_key.txt"
    if not stamp.exists() or stamp.read_text().strip() != key:
        shutil.rmtree(candidates, ignore_errors=True)
        candidates.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key + "\n")
    return candidates


def queue_experiment(winner: t.Row) -> dict[str, Any]:
    """``dvc exp run --queue`` of the pipeline with the winner as its student."""
    name = t.experiment_name(winner)
    command = ["dvc", "exp", "run", "--queue", "--name", name]
    for value in t.set_args(winner):
        command += ["-S", value]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"queued": False, "name": name, "command": command,
                "error": (done.stderr or done.stdout).strip()[-2000:]}  # fmt: skip
    return {"queued": True, "name": name, "command": command}


@flow(name="tune")
def tune_flow(
    seed: int,
    distill: DistillParams,
    augment: AugmentParams,
    quantize: QuantizeParams,
    evaluate: EvaluateParams,
    mlflow_params: MlflowParams,
    max_kb: float | None = None,
    max_latency_ms: float | None = None,
    trials: int = 12,
    families: tuple[str, ...] = t.FAMILIES,
    out_dir: Path = OUT_DIR,
    queue: bool = True,
) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.perf_counter()
    for needed in (TEACHER, TEACHER_ONNX, PREPARED_DIR):
        if not Path(needed).exists():
            raise FileNotFoundError(
                f"{needed} is missing: tune distils from the pipeline's teacher; "
                "run dvc repro first"
            )
    data = load_training_data()
    teacher = d.load_teacher.fn(TEACHER)
    height, _, channels = data.prepared.image_shape
    space = t.search_space(auto_input_size(height, distill.input_size, channels), families)
    key = tracking_key(seed, data, distill, augment, quantize)
    candidates_dir = fresh_state(out_dir, key)
    folders = {c.name: candidates_dir / c.name for c in space}
    batch = tile_batch(np.asarray(data.prepared.val.images))

    # 1. size up every architecture untrained; prune those over the budget
    untrained: dict[str, Path] = {}
    rows: dict[str, list[t.Row]] = {}
    for candidate in space:
        try:
            untrained[candidate.name] = size_up(
                candidate, data, distill, quantize, folders[candidate.name]
            )
        except Exception as exc:  # a candidate that fails is a result
            logger.warning("tune: %s could not be built: %s", candidate.name, exc)
            rows[candidate.name] = [_failed(candidate, exc)]
    teacher_ms, sized = size_and_speed(candidates_dir / "sized.json", teacher, untrained, batch,
                                       evaluate)  # fmt: skip
    budget = make_budget(max_kb, max_latency_ms, evaluate, teacher_ms)
    logger.info("tune: budget %s, %.3f ms per image (%s)", t.kb(budget.max_bytes),
                budget.max_latency_ms_b1, budget.latency_from)  # fmt: skip
    hopeful = [c for c in space if c.name in sized and not budget.hopeless(*sized[c.name])]
    for candidate in space:
        if candidate.name in sized and candidate not in hopeful:
            size, latency = sized[candidate.name]
            rows[candidate.name] = [t.Row.of(
                candidate, "", "pruned", int8_bytes=size, latency_ms_b1=latency,
                note="over the budget untrained (size, or latency beyond the noise margin)",
            )]  # fmt: skip
    if not hopeful:
        pruned = [row for group in rows.values() for row in group]
        raise t.BudgetError(t.impossible_budget(pruned, budget))
    chosen = t.spread(hopeful, {name: latency for name, (_, latency) in sized.items()}, trials)
    logger.info("tune: %d of %d architectures within the budget; fitting %d: %s", len(hopeful),
                len(space), len(chosen), ", ".join(c.name for c in chosen))  # fmt: skip
    for candidate in hopeful:
        if candidate not in chosen:
            rows[candidate.name] = [
                t.Row.of(candidate, "", "skipped", note=f"not among --trials {trials}")
            ]

    parent_params = {"max_kb": budget.max_bytes / 1000, "max_latency_ms": budget.max_latency_ms_b1,
                     "trials": trials, **run_parameters(seed, distill, augment)}  # fmt: skip
    with tracking.start_run(mlflow_params.experiment, "tune", stage="tune", variant="search",
                            params=parent_params) as parent:  # fmt: skip
        # 2. fit the chosen ones (a resumed search skips those already recorded)
        run_ids: dict[str, str] = {}  # each fit's MLflow child run
        for number, candidate in enumerate(chosen, 1):
            folder = folders[candidate.name]
            saved = _saved(folder)
            if saved is not None:
                logger.info("tune: %s (%d/%d) recorded by an earlier run", candidate.name,
                            number, len(chosen))  # fmt: skip
                rows[candidate.name], run_ids[candidate.name] = saved
                continue
            logger.info("tune: fitting %s (%d/%d)", candidate.name, number, len(chosen))
            try:
                rows[candidate.name], run_ids[candidate.name] = fit_candidate(
                    candidate, data, teacher, (seed, distill, augment, quantize), folder,
                    (parent.info.experiment_id, parent.info.run_id),
                )  # fmt: skip
            except Exception as exc:  # a candidate that fails is a result
                logger.warning("tune: %s failed: %s", candidate.name, exc)
                rows[candidate.name] = [_failed(candidate, exc)]

        # 3. time every fitted int8 model with the teacher; budget, front, winner
        flat = [row for c in space for row in rows.get(c.name, [])]
        fitted = {row.name: folders[row.candidate] / f"int8_{row.method}.onnx"
                  for row in flat if row.status == "ok"}  # fmt: skip
        teacher_b1, final = time_models(teacher, fitted, batch, evaluate)
        for row in flat:
            if row.name in final:
                row.latency_ms_b1 = final[row.name].latency_ms_b1
                row.latency_ms_b64 = final[row.name].latency_ms_b64
        # a ratio budget follows the teacher's latency in this measurement
        budget = make_budget(max_kb, max_latency_ms, evaluate, teacher_b1.latency_ms_b1)
        t.mark_front(flat)
        winner = t.choose(flat, budget)
        seconds = time.perf_counter() - started

        # 4. files, MLflow and the queued experiment
        out_dir.mkdir(parents=True, exist_ok=True)
        csv_path = t.write_csv(out_dir / "pareto.csv", flat)
        png_path = t.plot_front(out_dir / "pareto.png", flat, budget,
                                f"visionpipe tune: {len(fitted)} int8 students")  # fmt: skip
        queued = None
        if winner is not None and queue:
            queued = queue_experiment(winner)
        summary = {
            "budget": asdict(budget),
            "teacher_latency_ms_b1": teacher_b1.latency_ms_b1,
            "architectures": len(space),
            "fitted": sum(1 for c in chosen if rows[c.name][0].status == "ok"),
            "failed": sorted(r.name for r in flat if r.status == "failed"),
            "pruned": sorted(r.name for r in flat if r.status == "pruned"),
            "candidates": len(fitted),
            "search_seconds": round(seconds, 1),
            "winner": winner and asdict(winner),
            "queued": queued,
            "mlflow_run_id": parent.info.run_id,
        }
        json_path = write_json(out_dir / "tune.json", summary)
        numbers = {"search_seconds": seconds, "candidates": len(fitted)}
        tracking.log_results(parent.info.run_id, numbers, [csv_path, png_path, json_path])
        _log_children(run_ids, flat)
    if winner is None:
        raise t.BudgetError(t.impossible_budget(flat, budget))
    return summary


def make_budget(
    max_kb: float | None, max_latency_ms: float | None, evaluate: EvaluateParams, teacher_ms: float
) -> t.Budget:
    """The user's limits, or ``evaluate.student_budget``'s: its bytes, and its ratio times the
    teacher's single-image latency measured in the same rounds (``teacher_ms``)."""
    budget = evaluate.student_budget
    max_bytes = int(max_kb * 1000) if max_kb is not None else budget.max_int8_bytes
    if max_latency_ms is not None:
        return t.Budget(max_bytes, max_latency_ms, "--max-latency-ms")
    return t.Budget(
        max_bytes,
        budget.max_latency_ratio_b1 * teacher_ms,
        f"evaluate.student_budget.max_latency_ratio_b1 x the teacher's {teacher_ms:.3f} ms",
    )


def _log_children(run_ids: dict[str, str], rows: list[t.Row]) -> None:
    """Each fitted candidate's final latency and verdicts, on the child run of its fit (that of
    an earlier search, for a candidate a resumed search read back)."""
    for row in rows:
        if row.status != "ok":
            continue
        values = {
            "latency_ms_b1": row.latency_ms_b1, "latency_ms_b64": row.latency_ms_b64,
            "within_budget": row.within_budget, "on_front": row.on_front, "winner": row.winner,
        }  # fmt: skip
        metrics = {f"{row.method}.{k}": v for k, v in values.items()}
        tracking.log_results(run_ids[row.candidate], metrics, [])


def tracking_key(
    seed: int,
    data: TrainingData,
    distill: DistillParams,
    augment: AugmentParams,
    quantize: QuantizeParams,
) -> str:
    """What a candidate's record depends on: the teacher, the data and the params."""
    return fingerprint(
        file_md5(TEACHER), data.describe(), run_parameters(seed, distill, augment),
        quantize.model_dump(mode="json"),
    )  # fmt: skip
