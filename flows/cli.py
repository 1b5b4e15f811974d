"""The ``visionpipe`` command.

    visionpipe check    validate params.yaml; print every section as the stages will see it
    visionpipe compare  teacher, student and int8 student side by side (metrics/evaluate.json)
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
    commands.add_parser("status", help="show the Prefect API and MLflow URI").set_defaults(
        run=_status
    )
    commands.add_parser("down", help="stop the local Prefect server").set_defaults(run=_down)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
