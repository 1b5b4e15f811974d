"""The `visionpipe` command: check, compare, status, up, down."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from tests.command_imports import HEAVY, modules_loaded_by

ROOT = Path(__file__).resolve().parents[1]


def test_check_accepts_the_real_params(capsys):
    assert main(["check", "--params", str(ROOT / "params.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["distill"]["model"] == "efficientnet_lite0_trunk"


def test_check_rejects_a_bad_value_naming_key_and_choices(tmp_path, capsys):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["distill"]["model"] = "vit"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    assert main(["check", "--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "distill.model" in err and "'resnet'" in err and "'cnn'" in err and "'mobilenet'" in err


def test_compare_prints_one_row_per_variant(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    row = {"f1_macro": 0.9, "accuracy": 0.91, "params": 1000, "size_bytes": 4000,
           "latency_ms_b1": 0.5, "runtime": "r"}  # fmt: skip
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/evaluate.json").write_text(
        json.dumps({v: row for v in ("teacher", "student", "student_int8")})
    )
    assert main(["compare"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == [
        "teacher", "student", "student_int8",
    ]  # fmt: skip
    assert "| 0.9000 |" in lines[2]


def test_compare_without_results_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare"]) == 1
    assert "dvc repro" in capsys.readouterr().err


def test_status_shows_the_prefect_ui_of_a_configured_api(monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "Prefect UI:  http://127.0.0.1:4200\n" in out
    assert "MLflow tracking URI:" in out


def test_status_without_local_servers_says_how_to_start_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VISIONPIPE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "MLflow UI:   no local server running (`visionpipe up` starts one)" in out
    assert f"MLflow tracking URI: sqlite:///{tmp_path.resolve()}/mlflow.db" in out


def test_down_with_nothing_running_has_nothing_to_stop(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VISIONPIPE_HOME", str(tmp_path))
    assert main(["down"]) == 0
    assert "nothing to stop" in capsys.readouterr().out


def test_down_all_under_an_empty_folder_stops_nothing_and_under_needs_all(tmp_path, capsys):
    assert main(["down", "--all", "--under", str(tmp_path)]) == 0
    assert "no visionpipe server is running; nothing to stop" in capsys.readouterr().out
    assert main(["down", "--under", str(tmp_path)]) == 2
    assert "--under goes with --all" in capsys.readouterr().err


def test_the_idle_period_is_validated_naming_the_variable(monkeypatch):
    from tasks.servers import idle_seconds

    monkeypatch.setenv("VISIONPIPE_PREFECT_IDLE_S", "soon")
    with pytest.raises(ValueError, match=r"VISIONPIPE_PREFECT_IDLE_S='soon' is not a number"):
        idle_seconds()
    monkeypatch.setenv("VISIONPIPE_PREFECT_IDLE_S", "0")
    assert idle_seconds() == 0.0
    monkeypatch.delenv("VISIONPIPE_PREFECT_IDLE_S")
    assert idle_seconds() == 300.0


def test_up_exits_1_with_the_reason_when_a_server_fails(monkeypatch, capsys):
    # Real servers, up to down, are exercised in tests/test_services.py.
    def fail() -> dict[str, str]:
        raise RuntimeError("the local MLflow server on http://127.0.0.1:1 exited with status 1")

    monkeypatch.setattr("tasks.servers.up", fail)
    assert main(["up"]) == 1
    assert "visionpipe: the local MLflow server on http://127.0.0.1:1 exited" in (
        capsys.readouterr().err
    )


def test_a_stage_leases_the_local_server_also_when_pointed_at_it_by_url(tmp_path, monkeypatch):
    from flows.prefect_api import uses_local_server

    monkeypatch.setenv("VISIONPIPE_HOME", str(tmp_path))
    monkeypatch.delenv("VISIONPIPE_PREFECT", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert uses_local_server()  # no URL: the stage starts or reuses the local server
    (tmp_path / "prefect").mkdir()
    record = {"pid": 1, "api_url": "http://127.0.0.1:4321/api"}
    (tmp_path / "prefect" / "server.json").write_text(json.dumps(record))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4321/api")  # the printed URL
    assert uses_local_server()
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")  # a team's server
    assert not uses_local_server()


@pytest.mark.integration
@pytest.mark.parametrize("argv", [("--help",), ("compare",), ("status",), ("check",)])
def test_light_commands_load_no_ml_or_orchestration_library(tmp_path, argv):
    # what makes a command answer in well under a second: importing torch,
    # MLflow or Prefect alone takes seconds here
    modules, out = modules_loaded_by(tmp_path, *argv)
    heavy = {m for m in modules if m.split(".")[0] in HEAVY}
    assert heavy == set(), f"visionpipe {' '.join(argv)} imports {sorted(heavy)}"
    assert out  # it did answer


def test_serve_is_the_deprecated_name_of_serve_deployment(monkeypatch, capsys):
    served = []
    monkeypatch.setattr("flows.deploy.serve", served.append)
    monkeypatch.setattr("flows.cli._prefect_api", contextlib.nullcontext)
    assert main(["serve", "--name", "x"]) == 0
    assert "`serve` is now `serve-deployment`" in capsys.readouterr().err
    assert main(["serve-deployment", "--name", "y"]) == 0
    assert "is now" not in capsys.readouterr().err and served == ["x", "y"]


def test_serve_model_with_an_unknown_model_exits_2_saying_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve-model", "--model", "nothing-like-this"]) == 2
    assert "unknown model 'nothing-like-this'" in capsys.readouterr().err


def test_a_lease_names_its_stage_and_checkout_and_a_dead_holder_is_dropped(tmp_path, monkeypatch):
    from tasks.servers import lease, live_leases

    monkeypatch.chdir(tmp_path)
    with lease(tmp_path / "state", stage="distill"):
        (held,) = live_leases(tmp_path / "state")
        assert (held["pid"], held["stage"], held["checkout"]) == (
            os.getpid(),
            "distill",
            str(tmp_path),
        )
        # a process that died holding a lease: same pid file, another start time
        stale = {**held, "pid": os.getpid(), "started": held["started"] - 100}
        (tmp_path / "state" / "leases" / "1").write_text(json.dumps({**stale, "pid": 1}))
        assert [r["pid"] for r in live_leases(tmp_path / "state")] == [os.getpid()]
        assert not (tmp_path / "state" / "leases" / "1").exists()
    assert live_leases(tmp_path / "state") == []


def test_a_server_whose_start_time_moved_with_the_clock_is_still_that_server(monkeypatch):
    """psutil's create time follows the boot time, which a stepped clock moves (36 s on a
    CI VM): the process serving the recorded port is still the recorded server, so it is
    stopped when idle; a process with another command line is a reused pid, never signalled."""
    from tasks import servers

    now = servers.started_at(os.getpid())
    record = {"pid": os.getpid(), "pid_start": now - 36.0, "port": 4200}
    prefect = ["python", "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port"]
    monkeypatch.setattr(servers, "command_line", lambda pid: [*prefect, "4200"])
    assert servers.is_running(record)
    monkeypatch.setattr(servers, "command_line", lambda pid: [*prefect, "4201"])
    assert not servers.is_running(record)
    monkeypatch.setattr(servers, "command_line", lambda pid: ["python", "-m", "pytest"])
    assert not servers.is_running(record)
    assert servers.is_running({**record, "pid_start": now})  # the start time still decides first


def test_serves_port_reads_the_port_option_of_a_server_command():
    from tasks.servers import serves_port

    assert serves_port(["mlflow", "server", "--port", "5000", "--workers", "1"], 5000)
    assert not serves_port(["mlflow", "server", "--port", "5001"], 5000)
    assert not serves_port(["prefect", "worker", "start", "--port", "5000"], 5000)  # no server
    assert not serves_port(["mlflow", "server", "--port"], 5000)
    assert not serves_port(["mlflow", "server", "--port", "5000"], None)
