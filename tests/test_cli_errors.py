"""Bad input to the CLI gets a clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from pipelines.runner import ParameterError, parse_params
from tests.conftest import run_cli


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["epochs"], "expected KEY=VALUE"),
        (["epochs=three"], "expected int"),
        (["learning_rate=2"], "must be in (0, 1)"),
        (["colour=blue"], "unknown parameter"),
        (["workers=0"], "must be >= 1"),
    ],
)
def test_bad_param_values_name_the_parameter_and_the_problem(pairs: list[str], message: str) -> None:
    with pytest.raises(ParameterError, match=re.escape(message)):
        parse_params(pairs)


def test_params_are_typed() -> None:
    assert parse_params(["epochs=3", "learning-rate=0.01"]) == {"epochs": 3, "learning_rate": 0.01}


def test_run_with_missing_file_says_not_found(cli_env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli(["run", "--data", str(tmp_path / "missing.parquet"), "--json"], cli_env)
    assert result.code == 2
    assert "data file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_csv_file_says_it_is_not_parquet(cli_env: dict[str, str], tmp_path: Path) -> None:
    csv = tmp_path / "transactions.csv"
    pd.DataFrame({"amount": [1.0]}).to_csv(csv)
    result = run_cli(["run", "--data", str(csv)], cli_env)
    assert result.code == 2
    assert "is not a readable Parquet file" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_bad_param_fails_before_anything_starts(cli_env: dict[str, str]) -> None:
    result = run_cli(["run", "--generate", "1000", "--param", "epochs=lots"], cli_env)
    assert result.code == 2
    assert "--param epochs='lots': expected int" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_settings_are_reported_per_variable(cli_env: dict[str, str]) -> None:
    result = run_cli(["run", "--generate", "1000"], {**cli_env, "MLOPS_TRAIN_WORKERS": "-1"})
    assert result.code == 2
    assert "MLOPS_TRAIN_WORKERS" in result.stderr and "'-1'" in result.stderr


def test_data_generate_writes_a_reproducible_file(cli_env: dict[str, str], tmp_path: Path) -> None:
    for name in ("a", "b"):
        result = run_cli(
            ["data", "generate", "--rows", "2000", "--seed", "3", "--out", str(tmp_path / f"{name}.parquet")], cli_env
        )
        assert result.code == 0, result.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet"))


def test_data_generate_rejects_unknown_drift(cli_env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli(
        ["data", "generate", "--rows", "10", "--drift", "sideways", "--out", str(tmp_path / "x.parquet")], cli_env
    )
    assert result.code == 2 and "covariate" in result.stderr


def test_assigning_an_unknown_slot_or_version_is_refused_clearly(cli_env: dict[str, str]) -> None:
    unknown_slot = run_cli(["slot", "assign", "c", "1"], cli_env)
    assert unknown_slot.code == 2 and "unknown slot 'c'" in unknown_slot.stderr
    unknown_version = run_cli(["slot", "assign", "a", "999"], cli_env)
    assert unknown_version.code == 2 and "has no version '999'" in unknown_version.stderr
    assert "Traceback" not in unknown_version.stderr


def test_policy_commands_say_when_the_control_plane_is_down(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "MLOPS_CONTROL_PLANE_URL": "http://127.0.0.1:9"}
    result = run_cli(["policy", "show"], env)
    assert result.code == 1 and "control plane unreachable" in result.stderr


def test_rollout_commands_name_an_unreachable_controller_without_a_traceback(cli_env: dict[str, str]) -> None:
    from core.processes import free_port

    env = {**cli_env, "MLOPS_CONTROLLER_URL": f"http://127.0.0.1:{free_port()}"}
    result = run_cli(["rollout", "status"], env)
    assert result.code == 1
    assert "controller unreachable at http://127.0.0.1:" in result.stderr
    assert "is `mlops serve controller` running?" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_rollouts_client_tells_an_absent_controller_from_a_refusal() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from control_plane.rollouts_client import ControllerError, ControllerUnavailable, RolloutsClient
    from core.processes import free_port

    with pytest.raises(ControllerUnavailable), RolloutsClient(f"http://127.0.0.1:{free_port()}", timeout=2) as c:
        c.rollouts()

    class Refusing(BaseHTTPRequestHandler):  # a real HTTP server that answers like the controller refuses
        def do_POST(self) -> None:
            body = b'{"error": "version 7 is already the champion", "field": "challenger_version"}'
            self.send_response(409)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with RolloutsClient(url, token="t") as client, pytest.raises(ControllerError) as refused:
            client.start("7")
        assert refused.value.status == 409 and refused.value.error == "version 7 is already the champion"
    finally:
        server.shutdown()
        server.server_close()


def test_a_rollout_started_with_a_bad_spec_of_its_own_is_refused_naming_the_field(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    spec = tmp_path / "mine.yaml"
    spec.write_text(
        "name: mine\nanalysis_interval_s: 1\nfailure_limit: 1\npost_promotion_watch_s: 0\n"
        "phases: [{name: replay, kind: replay, requests: 0, min_samples: 1}]\n"
        "guardrails: [{name: e, kind: error_rate, applies_to: [replay], min_samples: 1}]\n"
    )
    result = run_cli(["rollout", "start", "3", "--spec", str(spec)], cli_env)
    assert result.code == 2, result.stderr
    assert "phases[0].requests: must be > 0, got 0" in " ".join(result.stderr.split())
