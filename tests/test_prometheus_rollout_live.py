"""A whole live rollout decided by a `kind: prometheus` guardrail: the real local stack (control plane, two
slots, gateway), a real controller process (`mlops serve controller`) with `MLOPS_PROMETHEUS_URL` pointing at a
real Prometheus (Debian's package) that scrapes the gateway's own /metrics every second, and rollouts under
their own spec (`POST /v1/rollouts` with `spec`) whose only guardrail is a PromQL one on the gateway's
per-variant counters: each variant's answered share of its slot calls.

- a challenger whose slot fails 30 % of its calls (a `defect: {error_rate: 0.3}` baked into the version, as the
  scenarios' error spike) is rolled back by that guardrail in the 50 % canary: the decision names it, the
  stored analyses carry the PromQL readings, the challenger never gets 100 % and the champion is back;
- a healthy challenger passes it at 50 % (against the champion) and at 100 % (against the bound), is
  promoted, passes the watch, and becomes the champion.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from mlflow import MlflowClient

from control_plane.client import ControlPlaneClient
from control_plane.rollouts_client import RolloutsClient
from core.processes import ManagedProcess, free_port, mlops_command, start_process, stop_process, wait_until_ready
from core.registry import alias_version
from core.settings import Settings
from mlops.local_stack import LocalStack
from monitoring.rollout.prometheus_guardrail import TEST_NAME
from tests.support import register_model, running_prometheus, wait_for_scrapes, wait_until
from tests.test_controller_driver import Traffic, wait_for_version

pytestmark = pytest.mark.slow
MODEL = "fraud-prometheus-rollout-test"
GUARDRAIL = "answered-share"

# Per variant: requests its slot answered / (those + its failed slot calls), over the last 5 s. A challenger
# call that fails is answered by the champion (status `fallback`, counted as the champion's), so `ok` alone is
# what the variant's own slot answered; a variant with no failed call has no error series, hence `or vector(0)`.
ANSWERED = 'sum(rate(gateway_requests_total{variant="{variant}",status="ok"}[5s]))'
FAILED = '(sum(rate(gateway_variant_errors_total{variant="{variant}"}[5s])) or vector(0))'
ANSWERED_SHARE: dict[str, Any] = {
    "name": GUARDRAIL,
    "kind": "prometheus",
    "applies_to": ["canary", "watch"],
    "query": f"{ANSWERED} / ({ANSWERED} + {FAILED})",
    "samples_query": 'sum(increase(gateway_requests_total{variant="{variant}"}[30s]))',
    "min_samples": 40,
    "higher_is_better": True,
    "max_relative_increase": 0.1,  # canary at 50 %: challenger >= 0.9 x the champion's share
    "bound": 0.9,  # canary at 100 % and the watch: the serving model answers >= 90 % of its calls
    "looks": 3,
    "step_s": 1,
}


def own_spec() -> dict[str, Any]:
    """The `fast` spec's timings (1 s analyses, two failures roll back, 4 s minimum steps), canary steps only,
    and the prometheus guardrail as the only one: nothing else can pass, fail or hold a step."""
    step = {"kind": "canary", "min_duration_s": 4, "min_samples": 40, "max_duration_s": 60}
    return {
        "name": "prometheus-only",
        "analysis_interval_s": 1,
        "failure_limit": 2,
        "post_promotion_watch_s": 6,
        "phases": [{"name": "canary-50", "weight": 0.5, **step}, {"name": "canary-100", "weight": 1.0, **step}],
        "guardrails": [ANSWERED_SHARE],
    }


@pytest.fixture(scope="module")
def world(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("prometheus-rollout")
    settings = Settings(home=root / "home", mlflow_tracking_uri=mlflow_server, model_name=MODEL)
    versions = {
        "champion": register_model(settings, root, seed=31),  # the first registered: the champion alias
        "failing": register_model(settings, root, seed=32, defect={"error_rate": 0.3}),
        "healthy": register_model(settings, root, seed=33),
    }
    env = {"MLOPS_MLFLOW_TRACKING_URI": mlflow_server, "MLOPS_MODEL_NAME": MODEL, "MLOPS_LOG_FLUSH_SECONDS": "0.3"}
    stack = LocalStack(root / "home", token="t", extra_env=env)
    controller: ManagedProcess | None = None
    try:
        stack.start()
        control = ControlPlaneClient(stack.url("control-plane"), token="t")
        control.assign("a", versions["champion"])
        control.set_policy({"a": 1.0, "b": 0.0}, False, "a", "start")
        wait_for_version(stack.url("slot-a"), versions["champion"])
        gateway = f"127.0.0.1:{stack.ports['gateway']}"
        with running_prometheus(root / "prometheus", [gateway], job="gateway") as prometheus:
            url = f"http://127.0.0.1:{free_port()}"
            controller_env = {**stack.env, "MLOPS_CONTROLLER_URL": url, "MLOPS_PROMETHEUS_URL": prometheus}
            controller = start_process(
                "controller", mlops_command("serve", "controller"), controller_env, root / "logs" / "controller"
            )
            wait_until_ready(controller, f"{url}/readyz", timeout=60)
            wait_for_scrapes(prometheus, "gateway_policy_generation", 3)
            yield {"stack": stack, "versions": versions, "controller": url, "control": control, "mlflow": mlflow_server}
    finally:
        if controller is not None:
            stop_process(controller)
        stack.stop()


def run_rollout(world: dict[str, Any], version: str) -> dict[str, Any]:
    """Start a rollout of `version` under the prometheus-only spec with traffic flowing, and follow it to its
    end; meanwhile record every traffic policy the control plane holds (the weights the challenger got)."""
    control: ControlPlaneClient = world["control"]
    policies = []
    with Traffic(world["stack"].url("gateway")) as traffic, RolloutsClient(world["controller"], "t", 10) as client:
        rollout_id = client.start(version, spec=own_spec())["rollout_id"]

        def finished() -> dict[str, Any] | None:
            policies.append(control.get_policy())
            view = client.rollout(rollout_id)
            return view if view["state"]["status"] in ("succeeded", "rolled_back", "aborted") else None

        final = wait_until(finished, 150, f"rollout {rollout_id} of version {version} to finish")
        decisions, analyses = client.decisions(rollout_id), client.analyses(rollout_id)
    return {
        "final": final["state"],
        "decisions": decisions,
        "analyses": analyses,
        "policies": policies,
        "statuses": traffic.statuses,
    }


def readings(analyses: list[dict[str, Any]], verdict: str) -> list[dict[str, Any]]:
    return [a["values"][GUARDRAIL] for a in analyses if a["verdicts"].get(GUARDRAIL) == verdict]


def champion_alias(world: dict[str, Any]) -> str | None:
    return alias_version(MlflowClient(world["mlflow"]), MODEL, "champion")


def test_a_challenger_failing_the_prometheus_guardrail_is_rolled_back_by_it_in_the_canary(world: dict) -> None:
    versions, control = world["versions"], world["control"]
    before = control.get_policy()
    champion = champion_alias(world)
    run = run_rollout(world, versions["failing"])

    final, decisions, analyses = run["final"], run["decisions"], run["analyses"]
    assert final["status"] == "rolled_back", final
    assert GUARDRAIL in final["reason"], final["reason"]
    # Started in the 50 % step, a failure counted there, then rolled back from there: never a step further.
    steps = [(d["to_status"], d["phase_index"], d["reason"]) for d in decisions]  # the phase each was taken in
    assert {(status, index) for status, index, _ in steps} == {("canary", 0), ("rolled_back", 0)}, steps
    assert steps[-1][0] == "rolled_back", steps
    # Rolled back by the guardrail's failures, not by the step's deadline (whose reason would say inconclusive).
    assert "guardrails failed" in steps[-1][2] and "(2/2 consecutive)" in steps[-1][2], steps
    # Only the prometheus guardrail judged (the log-based ones are not in the spec), all in the 50 % step.
    assert analyses and all(set(a["verdicts"]) <= {GUARDRAIL} for a in analyses), analyses[-1]["verdicts"]
    assert {a["phase_index"] for a in analyses} == {0}
    failed = readings(analyses, "fail")
    assert len(failed) >= 2, [a["verdicts"] for a in analyses]
    for value in failed:
        # The PromQL readings: the challenger answers ~70 % of its calls, the champion all of them.
        assert value["test"] == TEST_NAME and "broken at all 3 looks" in value["detail"], value
        assert value["baseline"] > 0.95 and value["limit"] == pytest.approx(0.9 * value["baseline"]), value
        assert 0.5 < value["value"] < 0.9 and value["samples"] >= 40, value
    # The challenger never served everyone, and the champion's traffic and alias are back.
    challenger_slot = "b" if before.champion_slot == "a" else "a"
    assert max(p.weights[challenger_slot] for p in run["policies"]) == 0.5
    after = control.get_policy()
    assert after.champion_slot == before.champion_slot and after.weights[challenger_slot] == 0.0
    assert champion_alias(world) == champion
    assert set(run["statuses"]) == {200}, "every failed challenger call was answered by the champion"


def test_a_healthy_challenger_passes_the_prometheus_guardrail_and_is_promoted(world: dict) -> None:
    versions, control = world["versions"], world["control"]
    before = control.get_policy()
    run = run_rollout(world, versions["healthy"])

    final, analyses = run["final"], run["analyses"]
    assert final["status"] == "succeeded", final
    steps = [(d["to_status"], d["phase_index"]) for d in run["decisions"]]  # the phase each was taken in
    assert steps == [("canary", 0), ("canary", 0), ("promoted_watching", 1), ("succeeded", 2)], steps
    passed = readings(analyses, "pass")
    # Passed against the champion at 50 % (relative), against the bound at 100 % and in the watch (absolute).
    assert any(v["baseline"] is not None and v["limit"] == pytest.approx(0.9 * v["baseline"]) for v in passed)
    assert any(v["baseline"] is None and v["limit"] == 0.9 for v in passed)
    assert {a["phase_index"] for a in analyses if a["verdicts"].get(GUARDRAIL) == "pass"} == {0, 1, 2}  # and the watch
    assert all(v["value"] >= 0.9 for v in passed), passed
    assert not readings(analyses, "fail")
    after = control.get_policy()
    assert after.champion_slot != before.champion_slot and after.weights[after.champion_slot] == 1.0
    assert champion_alias(world) == versions["healthy"]
    assert set(run["statuses"]) == {200}
