"""Alerting that reaches people: the chart's alert rules under `promtool test rules` (synthetic series, the
rules exactly as the chart renders them), the chart's Alertmanager config under `amtool check-config`, and a
real Alertmanager (Debian's `prometheus-alertmanager`) running the rendered config and delivering an alert to
a real HTTP receiver: the same receiver a rollout spec's notification hook names. `.ci/run` installs the
Debian packages `prometheus` (promtool) and `prometheus-alertmanager` (amtool and the server)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from core.processes import free_port, start_process, stop_process, wait_until_ready
from mlops.hook_receiver import HookReceiver
from monitoring.rollout.spec import HOOK_NOTIFICATIONS, fast_spec, load_spec
from tests.test_helm_chart import Helm, find, helm, render  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
PROMTOOL_TESTS = REPO / "tests" / "data" / "mlops-rules.promtool.yaml"
ALERTMANAGER_BINARY = "prometheus-alertmanager"  # Debian's name for the alertmanager binary


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's prometheus and prometheus-alertmanager (.ci/run does)")
    return path


def receivers_from_spec_hooks(spec_source: dict[str, Any]) -> list[dict[str, str]]:
    """The chart's `alertmanager.receivers` for a rollout spec: its notification hooks' urls and formats."""
    spec = load_spec(spec_source)
    return [
        {"url": hook.url, "format": hook.format}
        for hook in spec.hooks
        if any(event in HOOK_NOTIFICATIONS for event in hook.events)
    ]


def spec_with_hooks(*hooks: dict[str, Any]) -> dict[str, Any]:
    base = fast_spec().model_dump(mode="json", exclude_none=True)
    return {**base, "hooks": list(hooks)}


# --- the alert rules under promtool --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered_rules(helm: Helm) -> str:  # noqa: F811
    return find(render(helm), "ConfigMap", "prometheus-rules")["data"]["mlops-rules.yaml"]


def promtool_test(rules: str, directory: Path) -> subprocess.CompletedProcess[str]:
    (directory / "mlops-rules.yaml").write_text(rules)
    tests = directory / PROMTOOL_TESTS.name
    shutil.copyfile(PROMTOOL_TESTS, tests)
    return subprocess.run(
        [tool("promtool"), "test", "rules", tests.name],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_rendered_alert_rules_pass_their_promtool_tests(rendered_rules: str, tmp_path: Path) -> None:
    result = promtool_test(rendered_rules, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # Every alert of the rules file has a case that makes it fire.
    alerts = {r["alert"] for g in yaml.safe_load(rendered_rules)["groups"] for r in g["rules"]}
    cases = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    fired = {c["alertname"] for case in cases for c in case.get("alert_rule_test", []) if c["exp_alerts"]}
    assert fired == alerts


@pytest.mark.parametrize(
    ("original", "planted", "caught_alert"),
    [
        # A guardrail that passes (+1) would page; a failing one (-1) would not.
        ("expr: mlops_guardrail_verdict == -1", "expr: mlops_guardrail_verdict == 1", "GuardrailFailing"),
        # An error-rate threshold of 50 % instead of 5 % misses a challenger failing 10 % of its calls.
        (") > 0.05", ") > 0.5", "ChallengerErrorRateHigh"),
        # Drift must last 5 minutes, not 15, before it pages.
        ("max(mlops_drift_detected) == 1\n        for: 5m", "max(mlops_drift_detected) == 1\n        for: 15m",
         "DriftDetected"),
    ],
)  # fmt: skip
def test_promtool_catches_a_planted_bad_rule(
    rendered_rules: str, tmp_path: Path, original: str, planted: str, caught_alert: str
) -> None:
    assert rendered_rules.count(original) == 1
    result = promtool_test(rendered_rules.replace(original, planted), tmp_path)
    assert result.returncode != 0
    assert f"alertname: {caught_alert}" in result.stdout + result.stderr, result.stdout + result.stderr


def test_promtool_rejects_a_rule_that_does_not_parse(rendered_rules: str, tmp_path: Path) -> None:
    broken = rendered_rules.replace("mlops_guardrail_verdict == -1", "mlops_guardrail_verdict ==")
    result = promtool_test(broken, tmp_path)
    assert result.returncode != 0
    assert "parse error" in (result.stdout + result.stderr).lower()


# --- the Alertmanager config ---------------------------------------------------------------------------


def alertmanager_config(docs: list[dict[str, Any]]) -> str:
    return find(docs, "ConfigMap", "alertmanager-config")["data"]["alertmanager.yml"]


def amtool_check(config: str, directory: Path) -> subprocess.CompletedProcess[str]:
    path = directory / "alertmanager.yml"
    path.write_text(config)
    return subprocess.run(
        [tool("amtool"), "check-config", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_rendered_alertmanager_config_routes_to_the_spec_hooks_and_passes_amtool(
    helm: Helm,  # noqa: F811
    tmp_path: Path,
) -> None:
    spec = spec_with_hooks(
        {"name": "ops", "url": "https://ops.example.com/mlops", "events": ["rolled-back", "promoted"]},
        {"name": "chat", "url": "https://hooks.slack.com/services/T0/B0/x", "events": ["rolled-back"],
         "format": "slack"},
        {"name": "cab", "url": "https://cab.example.com/confirm", "events": ["confirm-promotion"]},
    )  # fmt: skip
    receivers = receivers_from_spec_hooks(spec)
    assert [r["url"] for r in receivers] == [
        "https://ops.example.com/mlops",
        "https://hooks.slack.com/services/T0/B0/x",
    ]
    docs = render(helm, "--set-json", f"alertmanager.receivers={json.dumps(receivers)}")
    config_text = alertmanager_config(docs)
    result = amtool_check(config_text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(config_text)
    (receiver,) = config["receivers"]
    assert config["route"]["receiver"] == receiver["name"]
    assert [w["url"] for w in receiver["webhook_configs"]] == ["https://ops.example.com/mlops"]
    assert [s["api_url"] for s in receiver["slack_configs"]] == ["https://hooks.slack.com/services/T0/B0/x"]
    # Prometheus sends its alerts to this Alertmanager's Service.
    prometheus = yaml.safe_load(find(docs, "ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    (target,) = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert find(docs, "Service", host)["spec"]["ports"][0]["port"] == int(port)


def test_amtool_catches_a_planted_bad_alertmanager_config(helm: Helm, tmp_path: Path) -> None:  # noqa: F811
    good = alertmanager_config(render(helm))
    assert amtool_check(good, tmp_path).returncode == 0
    bad = good.replace("receiver: platform-hooks", "receiver: nobody")  # a route to an undefined receiver
    result = amtool_check(bad, tmp_path)
    assert result.returncode != 0
    assert "nobody" in result.stdout + result.stderr


def test_without_alertmanager_prometheus_sends_no_alerts(helm: Helm) -> None:  # noqa: F811
    docs = render(helm, "--set", "alertmanager.enabled=false")
    assert not [d for d in docs if d["metadata"]["name"].startswith("alertmanager")]
    prometheus = yaml.safe_load(find(docs, "ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    assert "alerting" not in prometheus


def test_a_real_alertmanager_with_the_rendered_config_delivers_an_alert_to_the_hook_receiver(
    helm: Helm,  # noqa: F811
    tmp_path: Path,
) -> None:
    tool("amtool")
    binary = tool(ALERTMANAGER_BINARY)
    with HookReceiver(secret="") as receiver:
        spec = spec_with_hooks({"name": "ops", "url": receiver.url("/alerts"), "events": ["rolled-back"]})
        receivers = receivers_from_spec_hooks(spec)
        docs = render(
            helm,
            "--set-json", f"alertmanager.receivers={json.dumps(receivers)}",
            "--set", "alertmanager.groupWait=1s",
        )  # fmt: skip
        config = tmp_path / "alertmanager.yml"
        config.write_text(alertmanager_config(docs))
        port = free_port()
        server = start_process(
            "alertmanager",
            [binary, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
            env={"PATH": "/usr/bin:/bin"},
            log_dir=tmp_path,
        )  # fmt: skip
        try:
            wait_until_ready(server, f"http://127.0.0.1:{port}/-/ready", timeout=30)
            alert = {
                "labels": {"alertname": "RolloutRolledBack", "severity": "critical", "outcome": "rolled_back"},
                "annotations": {"summary": "A rollout was rolled back"},
            }
            assert httpx.post(f"http://127.0.0.1:{port}/api/v2/alerts", json=[alert], timeout=5).status_code == 200
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not receiver.received:
                time.sleep(0.2)
        finally:
            stop_process(server)
    assert receiver.received, f"no alert reached the receiver:\n{server.log_tail()}"
    body = receiver.received[0].body
    assert receiver.received[0].path == "/alerts"
    assert body["status"] == "firing"
    assert body["commonLabels"]["alertname"] == "RolloutRolledBack"
    assert body["alerts"][0]["annotations"]["summary"] == "A rollout was rolled back"
