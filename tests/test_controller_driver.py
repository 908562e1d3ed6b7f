"""The rollout controller driving a real stack: control plane, two BentoML slots, the gateway, MLflow.

Traffic goes through the real gateway; the controller reads the real prediction log, writes the
policy through the control-plane API and moves MLflow aliases. Phases are seconds long (the decision
logic is the same as with the default spec; only the numbers are compressed).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from control_plane.client import ControlPlaneClient
from core.schema import FEATURES
from core.settings import Settings
from core.synthetic import generate_transactions
from mlops.local_stack import LocalStack
from monitoring.rollout.driver import Controller
from monitoring.rollout.effects import LiveEffects
from monitoring.rollout.spec import load_spec
from monitoring.rollout.state_machine import ManualAbort, RolloutState
from monitoring.rollout.store import RolloutStore
from tests.support import register_model, shadow_canary_spec

pytestmark = pytest.mark.slow
MODEL = "fraud-controller-test"
SPEC = shadow_canary_spec("test", interval=0.5, watch_s=3)


@pytest.fixture(scope="module")
def world(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("controller")
    settings = Settings(home=root / "home", mlflow_tracking_uri=mlflow_server, model_name=MODEL)
    versions = {
        "v1": register_model(settings, root, seed=1),  # first version: champion
        "v2": register_model(settings, root, seed=2),
        "broken": register_model(settings, root, seed=3, defect={"error_rate": 0.6}),
        "unloadable": register_model(settings, root, seed=5, unloadable=True),
        "flipped": register_model(settings, root, seed=6, defect={"flip_share": 0.5}),  # declines half of all
    }
    stack = LocalStack(
        root / "home",
        token="t",
        extra_env={
            "MLOPS_MLFLOW_TRACKING_URI": mlflow_server,
            "MLOPS_MODEL_NAME": MODEL,
            "MLOPS_LOG_FLUSH_SECONDS": "0.3",
        },
    )
    try:
        stack.start()
        control = ControlPlaneClient(stack.url("control-plane"), token="t")
        control.assign("a", versions["v1"])
        control.set_policy({"a": 1.0, "b": 0.0}, False, "a", "start")
        wait_for_version(stack.url("slot-a"), versions["v1"])
        yield {
            "stack": stack,
            "control": control,
            "versions": versions,
            "mlflow": MlflowClient(mlflow_server),
            "db": f"sqlite:///{root / 'home' / 'control-plane.db'}",
        }
    finally:
        stack.stop()


def wait_for_version(slot_url: str, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{slot_url}/v1/status", timeout=2).json()["model_version"] == version:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{slot_url} never loaded version {version}")


def make_controller(world: dict) -> Controller:
    stack: LocalStack = world["stack"]
    effects = LiveEffects(
        world["control"], world["mlflow"], MODEL, {"a": stack.url("slot-a"), "b": stack.url("slot-b")}
    )
    return Controller(
        spec=load_spec(SPEC),
        store=RolloutStore(world["db"]),
        effects=effects,
        log_dir=stack.home / "prediction-log",
        model_name=MODEL,
        slot_ready_timeout_s=60,
    )


class Traffic:
    """Background clients through the gateway; every answer is recorded."""

    def __init__(self, gateway: str) -> None:
        rows = generate_transactions(500, seed=4).to_dict(orient="records")
        self.bodies = [
            json.dumps({"account_id": r["account_id"], **{k: r[k] for k in FEATURES}}, default=float) for r in rows
        ]
        self.gateway, self.statuses = gateway, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self.stop.is_set():
                self.statuses.append(client.post(f"{self.gateway}/v1/score", content=self.bodies[i % 500]).status_code)
                i += 1
                time.sleep(0.01)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def drive(controllers: list[Controller], rollout_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    store = controllers[0].store
    while time.monotonic() < deadline:
        for controller in controllers:
            controller.tick()
        status = store.get(rollout_id)[1].status
        if status in ("succeeded", "rolled_back", "aborted"):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"rollout still {store.get(rollout_id)[1].status}")


def alias(world: dict, name: str) -> str | None:
    try:
        return world["mlflow"].get_model_version_by_alias(MODEL, name).version
    except Exception:
        return None


def test_a_healthy_challenger_goes_through_shadow_and_canary_to_champion(world: dict) -> None:
    controller = make_controller(world)
    versions = world["versions"]
    with Traffic(world["stack"].url("gateway")) as traffic:
        rollout_id = controller.start(versions["v2"])
        assert drive([controller], rollout_id) == "succeeded"
    assert set(traffic.statuses) == {200}
    assert alias(world, "champion") == versions["v2"] and alias(world, "previous") == versions["v1"]
    policy = world["control"].get_policy()
    assert policy.champion_slot == "b" and policy.weights == {"a": 0.0, "b": 1.0}
    decisions = controller.store.decisions(rollout_id)
    assert [d["to_status"] for d in decisions] == ["shadow", "canary", "promoted_watching", "succeeded"]
    assert all("error-rate" in json.dumps(d["metrics"]) for d in decisions[1:3])  # the values behind each step


def test_an_error_prone_challenger_is_rolled_back_and_clients_stay_answered(world: dict) -> None:
    controller = make_controller(world)
    versions = world["versions"]
    with Traffic(world["stack"].url("gateway")) as traffic:
        rollout_id = controller.start(versions["broken"])  # into slot a, while v2 is champion in slot b
        assert drive([controller], rollout_id) == "rolled_back"
    assert set(traffic.statuses) == {200}  # failed challenger answers were answered by the champion
    policy = world["control"].get_policy()
    assert policy.champion_slot == "b" and policy.weights["a"] == 0.0 and not policy.shadow
    assert alias(world, "champion") == versions["v2"] and alias(world, "challenger") is None
    tag = world["mlflow"].get_model_version(MODEL, versions["broken"]).tags["mlops.rollout"]
    assert tag.startswith("rejected")
    last = controller.store.decisions(rollout_id)[-1]
    assert last["to_status"] == "rolled_back" and "error-rate" in json.dumps(last["metrics"])


def test_a_second_controller_waits_for_the_lease_and_resumes_without_deciding_twice(world: dict) -> None:
    first, second = make_controller(world), make_controller(world)
    versions = world["versions"]
    with Traffic(world["stack"].url("gateway")):
        rollout_id = first.start(versions["v1"])  # v1 (slot a) back as challenger of v2
        first.tick()
        assert second.tick() is None  # the first holds the lease: the second must not act
        # The first controller "dies" here: it never ticks again; its lease expires after 5 s.
        assert drive([second], rollout_id) == "succeeded"
    statuses = [d["to_status"] for d in second.store.decisions(rollout_id)]
    assert statuses.count("promoted_watching") == 1 and statuses[-1] == "succeeded"
    assert alias(world, "champion") == versions["v1"]


def test_rollout_state_survives_in_the_database(world: dict, tmp_path: Path) -> None:
    store = RolloutStore(world["db"])
    rollouts = store.list_rollouts(10, model_name=MODEL)
    assert {r["status"] for r in rollouts} == {"succeeded", "rolled_back"}
    assert store.active(MODEL) is None


def test_the_controller_process_takes_commands_from_the_cli(world: dict, tmp_path: Path) -> None:
    import subprocess

    import yaml

    from core.processes import free_port, mlops_command, start_process, stop_process, wait_until_ready

    stack: LocalStack = world["stack"]
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**SPEC, "analysis_interval_s": 60}))  # no automatic step: CLI drives it
    port = free_port()
    env = {**stack.env, "MLOPS_CONTROLLER_URL": f"http://127.0.0.1:{port}", "MLOPS_ROLLOUT_SPEC": str(spec_file)}
    controller = start_process("controller", mlops_command("serve", "controller"), env, tmp_path)
    try:
        wait_until_ready(controller, f"http://127.0.0.1:{port}/readyz", timeout=60)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(mlops_command(*args), env=env, capture_output=True, text=True, timeout=120)

        unauthorised = httpx.post(f"http://127.0.0.1:{port}/v1/rollouts", json={"challenger_version": "2"})
        assert unauthorised.status_code == 401
        started = cli("rollout", "start", world["versions"]["v2"], "--json")
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout.splitlines()[-1])["state"]["status"] == "shadow"
        aborted = cli("rollout", "abort", "--reason", "operator said no")
        assert aborted.returncode == 0, aborted.stderr
        status = json.loads(cli("rollout", "status", "--json").stdout.splitlines()[-1])
        assert status["state"]["status"] == "aborted"
        history = json.loads(cli("rollout", "history", "--json").stdout.splitlines()[-1])
        assert history["decisions"][-1]["reason"].endswith("operator said no")
        assert world["control"].get_policy().weights[world["control"].get_policy().champion_slot] == 1.0
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text  # what Prometheus scrapes
        rollout_id = status["rollout_id"]
        # Parsed, not matched as text: prometheus_client decides the order of labels in its output.
        info = [
            s.labels
            for f in text_string_to_metric_families(metrics)
            for s in f.samples
            if s.name == "mlops_rollout_info"
        ]
        assert info == [
            {
                "rollout_id": rollout_id,
                "status": "aborted",
                "phase": "shadow",
                "challenger_version": world["versions"]["v2"],
                "champion_version": status["plan"]["champion_version"],
            }
        ]
        assert 'mlops_rollout_decisions_total{outcome="aborted"}' in metrics
        assert "mlops_rollout_challenger_weight 0.0" in metrics
    finally:
        stop_process(controller)


def test_a_challenger_its_slot_cannot_load_is_rolled_back_and_the_old_version_is_never_judged_for_it(
    world: dict,
) -> None:
    # The slot keeps serving the version it had: that version's answers must not pass for the challenger's.
    controller = make_controller(world)
    deadline_spec = {**SPEC, "phases": [{**SPEC["phases"][0], "max_duration_s": 5}, *SPEC["phases"][1:]]}
    controller.spec = load_spec(deadline_spec)
    controller.slot_ready_timeout_s = 3
    versions = world["versions"]
    champion_before = alias(world, "champion")
    # The challenger's slot serves a good, older version when the rollout assigns it the unloadable one.
    challenger_slot = "b" if world["control"].get_policy().champion_slot == "a" else "a"
    older = versions["v1"] if champion_before != versions["v1"] else versions["v2"]
    world["control"].assign(challenger_slot, older)
    wait_for_version(world["stack"].url(f"slot-{challenger_slot}"), older)
    with Traffic(world["stack"].url("gateway")) as traffic:
        rollout_id = controller.start(versions["unloadable"])
        assert drive([controller], rollout_id, timeout=60) == "rolled_back"
    assert set(traffic.statuses) == {200}
    slot_status = httpx.get(f"{world['stack'].url('slot-' + challenger_slot)}/v1/status").json()
    assert slot_status["model_version"] == older
    assert f"loading version {versions['unloadable']}" in slot_status["last_error"]
    decisions = controller.store.decisions(rollout_id)
    reasons = " | ".join(d["reason"] for d in decisions)
    assert f"serves version {older}, not the challenger {versions['unloadable']}" in reasons
    assert all(d["to_status"] != "canary" for d in decisions), "never given live traffic"
    assert alias(world, "champion") == champion_before
    assert world["mlflow"].get_model_version(MODEL, versions["unloadable"]).tags["mlops.rollout"].startswith("rejected")


REPLAY_SPEC = {
    **SPEC,
    "phases": [
        {"name": "replay", "kind": "replay", "requests": 600, "min_samples": 300, "label_delay_s": 1},
        *SPEC["phases"],
    ],
    "guardrails": [
        {**SPEC["guardrails"][0], "applies_to": ["replay", "shadow", "canary", "watch"]},
        {"name": "decline-rate", "kind": "decline_rate", "applies_to": ["replay", "shadow"], "min_samples": 200,
         "max_change": 0.4},
    ],
}  # fmt: skip


def send_labelled(stack: LocalStack, count: int) -> int:
    """Requests through the gateway, each labelled at once (the labels token): the log's recent labelled traffic."""
    rows = generate_transactions(count, seed=21).to_dict(orient="records")
    labelled = 0
    with httpx.Client(timeout=10) as client:
        for row in rows:
            body = json.dumps({"account_id": row["account_id"], **{k: row[k] for k in FEATURES}}, default=float)
            answer = client.post(f"{stack.url('gateway')}/v1/score", content=body)
            if answer.status_code != 200:
                continue
            label = {"request_id": answer.json()["request_id"], "label": int(row["is_fraud"])}
            headers = {"Authorization": f"Bearer {stack.labels_token}"}
            labelled += (
                client.post(f"{stack.url('gateway')}/v1/feedback", json=label, headers=headers).status_code == 202
            )
    return labelled


def logged_since(stack: LocalStack, since: float) -> pd.DataFrame:
    from core.prediction_log import read_window

    time.sleep(1.0)  # the gateway flushes its log every 0.3 s
    frame = read_window(stack.home / "prediction-log" / "predictions", since)
    return frame if not frame.empty else pd.DataFrame(columns=["variant", "shadow_status"])


def tick_through_replay(controller: Controller, store: RolloutStore, rollout_id: str) -> RolloutState:
    """Tick the controller until its rollout has left the replay phase (at most a minute); its state then."""
    deadline = time.monotonic() + 60
    while store.get(rollout_id)[1].status == "replay" and time.monotonic() < deadline:
        controller.tick()
        time.sleep(0.3)
    return store.get(rollout_id)[1]


def test_replay_phase_on_a_real_slot_and_log_first_rollout_skips_then_a_worse_challenger_never_sees_traffic(
    world: dict,
) -> None:
    stack: LocalStack = world["stack"]
    versions, store = world["versions"], RolloutStore(world["db"])
    controller = make_controller(world)
    controller.spec = load_spec(REPLAY_SPEC)
    champion = alias(world, "champion")
    healthy = versions["v2"] if champion == versions["v1"] else versions["v1"]

    # First rollout with replay: the champion has answered no labelled request yet. The replay is inconclusive
    # and the spec says advance: it goes on to shadow, the reason recorded.
    rollout_id = controller.start(healthy)
    state = tick_through_replay(controller, store, rollout_id)
    assert state.status == "shadow", state.reason
    assert state.reason.startswith("replay phase replay inconclusive (only 0 replayed requests, 300 needed)")
    first = store.analyses(rollout_id)[0]
    assert first["phase_index"] == 0 and first["samples"] == 0 and first["window"]["labelled_found"] == 0
    controller.apply(rollout_id, ManualAbort(at=time.time(), reason="first-rollout case checked"))

    # Recent labelled traffic answered by the champion, then a challenger that declines half of it.
    assert send_labelled(stack, 700) >= 650
    time.sleep(1.5)  # older than the replay's label delay
    with Traffic(stack.url("gateway")) as traffic:
        began = time.time()
        rollout_id = controller.start(versions["flipped"])
        assert drive([controller], rollout_id, timeout=60) == "rolled_back"
    assert set(traffic.statuses) == {200}
    decisions = store.decisions(rollout_id)
    assert [d["to_status"] for d in decisions] == ["replay", "rolled_back"]
    assert "guardrails failed in replay phase replay" in decisions[-1]["reason"]
    assert "decline-rate" in decisions[-1]["reason"]
    served = logged_since(stack, began)
    assert len(served) > 0 and set(served["variant"]) == {"champion"}, "zero live requests to the challenger"
    assert served["shadow_status"].isna().all(), "zero shadow calls"
    window = store.analyses(rollout_id)[-1]["window"]
    assert window["kind"] == "replay" and window["requested"] == 600 and window["replayed"] >= 300
    assert window["champion_version"] == champion and window["until"] <= began - 1
    assert alias(world, "champion") == champion
    assert world["mlflow"].get_model_version(MODEL, versions["flipped"]).tags["mlops.rollout"].startswith("rejected")

    # A challenger as good as the champion is not held back by the replay on the same traffic: it goes on to
    # shadow. (These untrained test models decline nothing, so the decline rate may stay undecided: advance.)
    rollout_id = controller.start(healthy)
    state = tick_through_replay(controller, store, rollout_id)
    assert state.status == "shadow", state.reason
    replayed = [a for a in store.analyses(rollout_id) if a["phase_index"] == 0][-1]
    assert replayed["verdicts"]["error-rate"] == "pass" and "fail" not in replayed["verdicts"].values()
    assert replayed["samples"] >= 300
    controller.apply(rollout_id, ManualAbort(at=time.time(), reason="replay pass checked"))
