"""The ``visionpipe`` command.

    visionpipe check    validate params.yaml; print every section as the stages will see it
    visionpipe compare  teacher, student and int8 student side by side (metrics/evaluate.json)
    visionpipe audit    the data audit's top suspects: near-duplicates, label errors, outliers
    visionpipe predict  top-k labels for image files or folders (int8 student unless --model)
    visionpipe status   where runs are recorded (the Prefect UI/API, the MLflow tracking URI)
                        and every visionpipe server running on this machine
    visionpipe up       start (or reuse) local Prefect and MLflow servers; print their UIs
    visionpipe down     stop the local servers that `up` or the stages started
                        (--all: every visionpipe server, also those of deleted checkouts)
    visionpipe serve-model   serve a model over HTTP: POST image files, get labels
    visionpipe serve-deployment  run the scheduled retrain deployment here (Ctrl-C stops)
    visionpipe deploy   put the retrain deployment on a Prefect work pool (for `prefect worker`)
    visionpipe tune     search students within a size and latency budget (flows/tune.py);
                        queue the winner as a DVC experiment

The pipeline itself runs with ``dvc repro`` (DVC decides what is stale).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from tasks.params import ParamsError, load_params
from tasks.tuning import FAMILIES


def _check(args: argparse.Namespace) -> int:
    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(f"visionpipe: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(params.model_dump(mode="json"), indent=2))
    print(f"{args.params} is valid", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    import os

    from flows.prefect_api import MODE_ENV
    from tasks.servers import (
        local_server_url,
        mlflow_server_url,
        mlflow_state_dir,
        servers_on_machine,
        state_dir,
    )
    from tasks.tracking_store import tracking_uri

    url = os.environ.get("PREFECT_API_URL")
    if url:
        how = "from PREFECT_API_URL"
    elif os.environ.get(MODE_ENV, "").lower() == "ephemeral":
        how = f"Prefect's ephemeral per-process server ({MODE_ENV}=ephemeral)"
    elif url := local_server_url():
        how = f"local server, state in {state_dir()}"
    else:
        how = "no local server running; the next stage starts one"
    if url:
        print(f"Prefect UI:  {url.removesuffix('/api')}")
        print(f"Prefect API: {url} ({how})")
    else:
        print(f"Prefect API: {how}")
    if mlflow_url := mlflow_server_url():
        print(f"MLflow UI:   {mlflow_url} (local server, state in {mlflow_state_dir()})")
    else:
        print("MLflow UI:   no local server running (`visionpipe up` starts one)")
    print(f"MLflow tracking URI: {tracking_uri()}")
    servers = servers_on_machine()
    print(f"visionpipe servers on this machine: {len(servers)}")
    for server in servers:
        print(f"  {server.describe()}")
    if any(server.orphaned for server in servers):
        print("  (`visionpipe down --all` stops them all, also those whose checkout is gone)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from tasks.evaluation.report import comparison_markdown
    from tasks.layout import metrics_path

    path = metrics_path("evaluate")
    if not path.is_file():
        print(f"visionpipe: {path} does not exist yet: run `dvc repro`", file=sys.stderr)
        return 1
    print(comparison_markdown(json.loads(path.read_text())))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from tasks.data.gallery import suspects_table
    from tasks.layout import AUDIT_GALLERY_DIR, AUDIT_REPORT

    if not AUDIT_REPORT.is_file():
        print(
            f"visionpipe: {AUDIT_REPORT} does not exist yet: run `dvc repro audit`", file=sys.stderr
        )
        return 1
    print(suspects_table(json.loads(AUDIT_REPORT.read_text()), args.top, args.kind))
    print(
        f"\nThe pictures: {AUDIT_GALLERY_DIR / 'index.html'}. To leave files out of the next run, "
        "list them in the audit.exclude file (params.yaml) and run `dvc repro`.",
        file=sys.stderr,
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    """One line (or JSON object) per image on stdout, broken ones included; exit 1 if any."""
    from tasks.inference import ModelError
    from tasks.serving.predict import collect_paths, load_model, predict_paths

    try:
        model = load_model(args.model, threads=args.threads)
    except ModelError as exc:
        print(f"visionpipe: {exc}", file=sys.stderr)
        return 2
    print(f"visionpipe: predicting with {model.describe()}", file=sys.stderr)
    predictions = predict_paths(model, collect_paths(args.paths), args.top_k)
    if args.json:
        print(json.dumps([p.to_json() for p in predictions], indent=2))
    else:
        print("\n".join(p.to_text() for p in predictions))
    return 0 if all(p.ok for p in predictions) else 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _up(args: argparse.Namespace) -> int:
    import os

    from tasks.servers import mlflow_state_dir, state_dir, up

    print("visionpipe: starting the local Prefect and MLflow servers...", file=sys.stderr)
    try:
        urls = up()
    except RuntimeError as exc:
        print(f"visionpipe: {exc}", file=sys.stderr)
        return 1
    if args.json:  # one line, for scripts and tests
        print(json.dumps(urls))
        return 0
    print(f"Prefect UI:  {urls['prefect_ui']}")
    print(f"Prefect API: {urls['prefect_api']}")
    print(f"MLflow UI:   {urls['mlflow']}")
    print(f"logs and PIDs: server.log, server.json in {state_dir()} and {mlflow_state_dir()}")
    print("stop both with `visionpipe down`")
    # Set in this shell, these win over the local servers (prefect_api.py, tasks/tracking_store.py).
    for variable in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        if value := os.environ.get(variable):
            print(f"note: {variable}={value} is set, so stages report there, not here")
    return 0


def _down(args: argparse.Namespace) -> int:
    from tasks.servers import ServerInUse, down, down_all

    if args.under and not args.all:
        print("visionpipe: --under goes with --all", file=sys.stderr)
        return 2
    try:
        stopped = down_all(args.under, args.force) if args.all else down(args.force)
    except ServerInUse as exc:
        print(f"visionpipe: {exc}", file=sys.stderr)
        return 1
    for line in stopped:
        print(f"stopped the {line}")
    if not stopped:
        what = "visionpipe server" if args.all else "local Prefect or MLflow server"
        print(f"no {what} is running; nothing to stop")
    return 0


@contextlib.contextmanager
def _prefect_api(command: str) -> Iterator[None]:
    """Prefect settings pointing at the API the stages use (started if need be), with a
    lease on the local server for as long as the command runs (``serve`` runs for days)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.prefect_api import resolve_api_url, uses_local_server
    from tasks.servers import lease

    with lease(stage=command) if uses_local_server() else contextlib.nullcontext():
        api_url = resolve_api_url()
        with temporary_settings(updates={PREFECT_API_URL: api_url} if api_url else {}):
            yield


def _serve_deployment(args: argparse.Namespace) -> int:
    from flows.deploy import serve

    if args.command == "serve":
        print(
            "visionpipe: `serve` is now `serve-deployment` (it runs the scheduled retrain "
            "deployment); `serve-model` serves a model over HTTP. `serve` will go away.",
            file=sys.stderr,
        )
    with _prefect_api("visionpipe serve-deployment"):
        serve(args.name)  # until interrupted
    return 0


def _serve_model(args: argparse.Namespace) -> int:
    from tasks.inference import ModelError
    from tasks.serving.server import ModelServer, ModelSlot

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        slot = ModelSlot(args.model, args.threads, args.refresh_s, log)
    except ModelError as exc:
        print(f"visionpipe: {exc}", file=sys.stderr)
        return 2
    server = ModelServer(
        (args.host, args.port), slot, top_k=args.top_k, max_bytes=args.max_mb * 2**20,
        max_inflight=args.max_inflight, access_log=args.access_log,
    )  # fmt: skip
    identity = slot.identity
    log(f"visionpipe: serving {identity.name} version {identity.version or '-'}"
        f"{f' (alias {identity.alias})' if identity.alias else ''} on {server.url}: "
        "GET /health, POST /predict")  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy

    config = load_params().retrain
    with _prefect_api("visionpipe deploy"):
        name = deploy(args.pool, args.name)
    print(f"deployment {name} on work pool {args.pool!r}: cron {config.cron!r} "
          f"({config.timezone}), at most 1 run at a time")  # fmt: skip
    print(f"run it now:   prefect deployment run {name!r}")
    print(f"run its runs: prefect worker start --pool {args.pool!r}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from flows.prefect_api import run_stage
    from flows.tune import tune_flow
    from tasks.tuning import BudgetError, kb

    try:
        params = load_params()
    except ParamsError as exc:
        print(f"visionpipe: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_stage(
            tune_flow, seed=params.seed, distill=params.distill, augment=params.augment,
            quantize=params.quantize, evaluate=params.evaluate, mlflow_params=params.mlflow,
            max_kb=args.max_kb, max_latency_ms=args.max_latency_ms, trials=args.trials,
            families=tuple(args.families), out_dir=args.out, queue=not args.no_queue,
        )  # fmt: skip
    except (BudgetError, FileNotFoundError) as exc:  # nothing fits; no pipeline to tune
        print(f"visionpipe tune: {exc}", file=sys.stderr)
        return 2
    winner = summary["winner"]
    print(
        f"{summary['candidates']} int8 students measured in {summary['search_seconds']:.0f} s "
        f"({len(summary['pruned'])} architectures pruned over budget, "
        f"{len(summary['failed'])} failed): {args.out / 'pareto.csv'}, {args.out / 'pareto.png'}"
    )
    print(f"winner: {winner['candidate']} with {winner['method'].upper()}: val macro-F1 "
          f"{winner['val_f1_macro_int8']:.4f}, {kb(winner['int8_bytes'])}, "
          f"{winner['latency_ms_b1']:.3f} ms per image")  # fmt: skip
    queued = summary["queued"]
    if queued and queued["queued"]:
        print(f"queued as DVC experiment {queued['name']!r}: `dvc queue start` runs it (distill, "
              f"quantize, evaluate: its test score), `dvc exp show` lists it, "
              f"`dvc exp apply {queued['name']}` makes it the pipeline's student")  # fmt: skip
    elif queued:
        print(f"visionpipe tune: could not queue the winner: {queued['error']}", file=sys.stderr)
        print("run it by hand: " + " ".join(queued["command"]).replace("--queue ", ""))
        return 1
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visionpipe", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate params.yaml and print it")
    check.add_argument("--params", default="params.yaml")
    check.set_defaults(run=_check)
    commands.add_parser("compare", help="the three variants side by side").set_defaults(
        run=_compare
    )
    audit = commands.add_parser("audit", help="the data audit's top suspects (reports/audit.json)")
    audit.add_argument("--top", type=int, default=10, help="rows per kind (default 10)")
    audit.add_argument(
        "--kind",
        choices=["near_duplicate", "label_issue", "outlier", "blank", "too_dark", "too_bright"],
        help="only this kind",
    )
    audit.set_defaults(run=_audit)
    predict = commands.add_parser(
        "predict",
        help="top-k labels for images",
        description="Exit status: 0 every image predicted, 1 some could not be read "
        "(each reported, the others still predicted), 2 the model cannot be loaded.",
    )
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument(
        "--model",
        default="student_int8",
        help="teacher, student, student_int8 (default), a .pt/.onnx file or an MLflow URI",
    )
    predict.add_argument("--top-k", type=_positive, default=3, help="labels per image (3)")
    predict.add_argument("--json", action="store_true", help="print a JSON list")
    predict.add_argument("--threads", type=_positive, default=1, help="CPU threads (1)")
    predict.set_defaults(run=_predict)
    commands.add_parser("status", help="show the Prefect API and MLflow URI").set_defaults(
        run=_status
    )
    up = commands.add_parser("up", help="start local Prefect and MLflow servers")
    up.add_argument("--json", action="store_true", help="print the URLs as one JSON object")
    up.set_defaults(run=_up)
    down = commands.add_parser("down", help="stop the local servers")
    down.add_argument(
        "--all", action="store_true",
        help="every visionpipe server of this user on the machine, also those of deleted checkouts",
    )  # fmt: skip
    down.add_argument(
        "--under", type=Path, metavar="DIR", help="with --all: only servers whose state is in DIR"
    )
    down.add_argument(
        "--force", action="store_true",
        help="stop the Prefect server even while a running stage (of any checkout) uses it",
    )  # fmt: skip
    down.set_defaults(run=_down)
    model = commands.add_parser(
        "serve-model",
        help="serve a model over HTTP (POST /predict image files)",
        description="GET /health; POST /predict with image files (multipart field 'files', or "
        'JSON {"files": [{"name", "data": base64}]}); answers as predict --json does.',
    )
    model.add_argument(
        "--model", default="student_int8",
        help="as predict's --model; an alias URI (models:/NAME@ALIAS) follows the alias",
    )  # fmt: skip
    model.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    model.add_argument("--port", type=int, default=8080, help="port (8080; 0: any free one)")
    model.add_argument("--top-k", type=_positive, default=3, help="labels per image (3)")
    model.add_argument("--threads", type=_positive, default=1, help="CPU threads per model (1)")
    model.add_argument("--max-mb", type=_positive, default=16, help="largest request body (16)")
    model.add_argument(
        "--max-inflight", type=_positive, default=4, help="requests predicted at once (4)"
    )
    model.add_argument(
        "--refresh-s", type=float, default=30.0,
        help="how often an alias URI is checked for a new version (30)",
    )  # fmt: skip
    model.add_argument("--access-log", action="store_true", help="log every request")
    model.set_defaults(run=_serve_model)
    deployment = commands.add_parser(
        "serve-deployment", help="run the scheduled retrain deployment here"
    )
    old_name = commands.add_parser("serve", help="deprecated name of serve-deployment")
    for serve in (deployment, old_name):
        serve.add_argument("--name", default="nightly", help="deployment name (nightly)")
        serve.set_defaults(run=_serve_deployment)
    deploy = commands.add_parser("deploy", help="deploy retrain to a Prefect work pool")
    deploy.add_argument("--pool", required=True, help="work pool (prefect work-pool create)")
    deploy.add_argument("--name", default="nightly", help="deployment name (nightly)")
    deploy.set_defaults(run=_deploy)
    tune = commands.add_parser(
        "tune",
        help="search students within a size and latency budget",
        description="Sizes up every student of the grid, fits up to --trials of those within "
        "the budget (distilled from the pipeline's teacher; PTQ and QAT each), times them with "
        "the teacher, writes the Pareto front to --out, and queues the best int8 val macro-F1 "
        "within the budget as a DVC experiment. Run after dvc repro. An interrupted search "
        "resumes. Exit status: 0 done, 1 the winner could not be queued, 2 nothing fits.",
    )
    tune.add_argument("--max-kb", type=_positive_float, help="largest int8 ONNX file, KB of 1000 "
                      "bytes (default: evaluate.student_budget.max_int8_bytes)")  # fmt: skip
    tune.add_argument(
        "--max-latency-ms", type=_positive_float,
        help="slowest single-image latency on this machine with evaluate.num_threads threads "
        "(default: evaluate.student_budget.max_latency_ratio_b1 x the teacher's, timed alongside)",
    )  # fmt: skip
    tune.add_argument("--trials", type=_positive, default=12,
                      help="students to fit, spread over the latency range (12)")  # fmt: skip
    tune.add_argument(
        "--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
        help="student families to search (all): trunk (EfficientNet-Lite0's first blocks, "
        "ImageNet weights), mobilenet, cnn (from scratch)",
    )  # fmt: skip
    tune.add_argument("--out", type=Path, default=Path("reports/tune"), help="(reports/tune)")
    tune.add_argument("--no-queue", action="store_true", help="do not queue the winner")
    tune.set_defaults(run=_tune)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
