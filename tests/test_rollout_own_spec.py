"""A rollout started with a spec of its own (a scenario's, a team's): validated by the same loader as a spec file
(422 naming each bad field), stored with the rollout, and what the controller then runs that rollout under; the
analysis window is stored with each analysis; a database made before these columns existed gets them."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

from starlette.testclient import TestClient

from monitoring.rollout.driver import Controller, plan_for
from monitoring.rollout.service import create_controller_app
from monitoring.rollout.spec import fast_spec, load_spec
from monitoring.rollout.state_machine import AnalysisResult, initial_state
from monitoring.rollout.store import RolloutStore
from tests.test_replay_phase import SPEC

TOKEN = "t"


def test_a_start_request_with_a_bad_spec_is_refused_naming_each_field_and_nothing_is_stored(tmp_path: Path) -> None:
    store = RolloutStore(f"sqlite:///{tmp_path / 'cp.db'}")
    # No effects: a refused request must never reach the control plane or the registry.
    controller = Controller(spec=fast_spec(), store=store, effects=None, log_dir=tmp_path, model_name="fraud")  # type: ignore[arg-type]
    bad = {**SPEC, "phases": [{**SPEC["phases"][0], "requests": 0}, *SPEC["phases"][1:]]}
    with TestClient(create_controller_app(controller, TOKEN, run_loop=False)) as client:
        answer = client.post(
            "/v1/rollouts",
            json={"challenger_version": "7", "spec": bad},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert answer.status_code == 422
        assert answer.json()["field"] == "spec"
        assert answer.json()["problems"] == [
            "phases[0].requests: must be > 0, got 0: a replay phase replays at least one request"
        ]
        not_a_spec = client.post(
            "/v1/rollouts", json={"challenger_version": "7", "spec": "fast"}, headers={"Authorization": "Bearer t"}
        )
        assert not_a_spec.status_code == 422 and not_a_spec.json()["field"] == "spec"
        assert client.post("/v1/rollouts", json={"challenger_version": "7", "spec": SPEC}).status_code == 401
        business = {"name": "chargebacks", "kind": "prometheus", "applies_to": ["canary"], "min_samples": 10,
                    "query": 'good_ratio{variant="{variant}"}', "samples_query": 'n{variant="{variant}"}',
                    "max_relative_increase": 0.1}  # fmt: skip
        unjudgeable = client.post(
            "/v1/rollouts",
            json={"challenger_version": "7", "spec": {**SPEC, "guardrails": [*SPEC["guardrails"], business]}},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert unjudgeable.status_code == 422, unjudgeable.text
        assert "(chargebacks).kind: prometheus needs a Prometheus server" in unjudgeable.json()["problems"][0]
    assert store.list_rollouts() == []


def test_a_rollout_runs_under_the_spec_stored_with_it_and_others_under_the_controllers(tmp_path: Path) -> None:
    store = RolloutStore(f"sqlite:///{tmp_path / 'cp.db'}")
    own = load_spec(SPEC)
    plan = plan_for(own, "fraud", "7", "6", "a", None, rollout_id="r-own")
    store.create(plan, initial_state(plan, 0.0), spec=own.model_dump(mode="json", exclude_none=True))
    other = plan_for(fast_spec(), "fraud", "8", "6", "a", None, rollout_id="r-default")
    store.create(other, replace(initial_state(other, 0.0), status="aborted"))  # finished: not the active one
    controller = Controller(spec=fast_spec(), store=RolloutStore(store.url), effects=None, log_dir=tmp_path,
                            model_name="fraud")  # type: ignore[arg-type]  # fmt: skip
    assert controller.spec_for("r-own") == own and controller.spec_for("r-own").name == "replay-test"
    assert controller.spec_for("r-default") == fast_spec()
    assert controller.tick_interval() == own.analysis_interval_s  # r-own is the active rollout


def test_an_analysis_window_is_stored_and_an_older_database_gets_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the two tables as an earlier version created them
        db.execute(
            "CREATE TABLE rollout_analyses (rollout_id VARCHAR(256) NOT NULL, seq INTEGER NOT NULL, at FLOAT NOT NULL,"
            " phase_index INTEGER NOT NULL, samples INTEGER NOT NULL, verdict VARCHAR(32) NOT NULL, verdicts TEXT NOT"
            ' NULL, "values" TEXT NOT NULL, state_version INTEGER NOT NULL, transition BOOLEAN NOT NULL, PRIMARY KEY'
            " (rollout_id, seq))"
        )
    store = RolloutStore(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(rollout_analyses)")}
    assert "window" in columns
    plan = plan_for(load_spec(SPEC), "fraud", "7", "6", "a", None, rollout_id="r1")
    store.create(plan, initial_state(plan, 0.0))
    window = {"kind": "replay", "requested": 1000, "labelled_found": 0}
    store.record_analysis("r1", AnalysisResult(1.0, 0, 0, {}, window=window), 0)
    assert store.analyses("r1")[0]["window"] == window
    assert store.latest_analysis("r1").window == window
    assert store.spec_of("r1") is None
    RolloutStore(f"sqlite:///{path}").close()  # a second open finds nothing to add
