"""The ``visionpipe`` command.

    visionpipe check    validate params.yaml; print every section as the stages will see it
    visionpipe compare  teacher, student and int8 student side by side (metrics/evaluate.json)
    visionpipe predict  top-k labels for image files or folders (int8 student unless --model)
    visionpipe status   where runs are recorded: the Prefect UI/API and the MLflow tracking URI
    visionpipe down     stop the local Prefect server that the stages started

The pipeline itself runs with ``dvc repro`` (DVC decides what is stale).
"""

from __future__ import annotations

import argparse
import json
import sys

from tasks.params import ParamsError, load_params


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

    from flows.prefect_api import MODE_ENV, local_server_url, state_dir
    from tasks.tracking import tracking_uri

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
    print(f"MLflow tracking URI: {tracking_uri()}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from tasks.evaluate import comparison_markdown
    from tasks.layout import metrics_path

    path = metrics_path("evaluate")
    if not path.is_file():
        print(f"visionpipe: {path} does not exist yet: run `dvc repro`", file=sys.stderr)
        return 1
    print(comparison_markdown(json.loads(path.read_text())))
    return 0


def _predict(args: argparse.Namespace) -> int:
    """One line (or JSON object) per image on stdout, broken ones included; exit 1 if any."""
    from tasks.predict import ModelError, collect_paths, load_model, predict_paths

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


def _down(args: argparse.Namespace) -> int:
    from flows.prefect_api import state_dir, stop_local_server

    if stop_local_server():
        print(f"stopped the local Prefect server ({state_dir()})")
    else:
        print("no local Prefect server was recorded; nothing to stop")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visionpipe", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate params.yaml and print it")
    check.add_argument("--params", default="params.yaml")
    check.set_defaults(run=_check)
    commands.add_parser("compare", help="the three variants side by side").set_defaults(
        run=_compare
    )
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
    commands.add_parser("down", help="stop the local Prefect server").set_defaults(run=_down)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
