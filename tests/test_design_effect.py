"""Account clustering in planning: the design effect measured on a log window, and the planner sizing deadlines
with it (issue 11, point 6: requests cluster by account, so a phase decides later than independent requests
would let it)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from core.prediction_log import FEEDBACK_SCHEMA, PREDICTION_SCHEMA, BatchedParquetLog
from mlops.cli import app
from monitoring.rollout.clustering import design_effect, measure_design_effects, planning_design_effect
from monitoring.rollout.planner import plan
from monitoring.rollout.spec import Planning, SpecError, default_spec, load_spec


def test_one_request_per_account_has_a_design_effect_of_one() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random(5_000) < 0.05).astype(float)
    assert design_effect(x, np.arange(len(x)).astype(str)) == pytest.approx(1.0)


def test_accounts_whose_requests_all_agree_have_a_design_effect_of_their_size() -> None:
    # 500 accounts of 10 requests, each account's label the same on all of them: 10 requests carry one's information
    rng = np.random.default_rng(1)
    per_account = (rng.random(500) < 0.1).astype(float)
    x, accounts = np.repeat(per_account, 10), np.repeat(np.arange(500), 10).astype(str)
    assert design_effect(x, accounts) == pytest.approx(10.0, rel=0.01)
    # ... and accounts whose requests are independent draws are back near 1
    independent = (rng.random(5_000) < 0.1).astype(float)
    assert 0.8 < design_effect(independent, accounts) < 1.2


def _window(rng: np.random.Generator, n: int, accounts: int, shared: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """n requests of `accounts` accounts; an account's fraud propensity is shared by its requests (`shared`: how
    much of the variation is the account's)."""
    account = rng.integers(0, accounts, n)
    risk = np.where(rng.random(accounts) < shared, 0.6, 0.01)[account]
    label = (rng.random(n) < risk).astype(int)
    score = np.clip(risk * 0.5 + rng.normal(0, 0.05, n), 0, 1)
    ids = [f"r{i}" for i in range(n)]
    predictions = pd.DataFrame({"request_id": ids, "account_id": [f"acc{a}" for a in account], "score": score,
                                "shadow_score": np.clip(score + rng.normal(0, 0.02, n), 0, 1)})  # fmt: skip
    feedback = pd.DataFrame({"request_id": ids, "label": label})
    return predictions, feedback


def test_every_signal_is_measured_and_the_largest_is_the_one_to_plan_with() -> None:
    rng = np.random.default_rng(2)
    predictions, feedback = _window(rng, 20_000, 400, shared=0.05)
    effects = {e.signal: e for e in measure_design_effects(predictions, feedback, threshold=0.2)}
    assert set(effects) == {"declines", "fraud labels", "paired log-loss difference", "paired recall difference"}
    assert effects["paired recall difference"].rows == int((feedback["label"] == 1).sum())  # the frauds only
    assert effects["fraud labels"].accounts == 400 and effects["fraud labels"].rows == 20_000
    assert effects["fraud labels"].design_effect > 3  # 50 requests per account sharing a risk
    suggested = planning_design_effect(list(effects.values()))
    assert suggested == max(e.design_effect for e in effects.values())
    # Unclustered traffic: every account sends one request
    flat, flat_feedback = _window(rng, 20_000, 10**9, shared=0.05)
    flat_effects = measure_design_effects(flat, flat_feedback, threshold=0.2)
    assert all(0.8 < e.design_effect < 1.2 for e in flat_effects), flat_effects
    assert planning_design_effect(flat_effects) >= 1.0
    # Without labels, declines only; nothing answered, nothing measured
    assert [e.signal for e in measure_design_effects(predictions, pd.DataFrame(), 0.2)] == ["declines"]
    assert measure_design_effects(predictions.assign(score=np.nan), feedback, 0.2) == []


def test_a_design_effect_below_one_or_not_a_number_is_refused_naming_the_field() -> None:
    data = default_spec().model_dump(exclude_none=True)
    for bad in (0.5, math.nan, math.inf):
        with pytest.raises(SpecError) as caught:
            load_spec({**data, "planning": {**data["planning"], "design_effect": bad}})
        message = "must be >= 1" if bad == 0.5 else "Input should be a finite number"
        assert any(p.startswith(f"planning.design_effect: {message}") for p in caught.value.problems), bad


def test_clustered_traffic_takes_longer_to_decide_and_the_planner_asks_for_a_longer_deadline() -> None:
    spec = default_spec()
    base = spec.planning or Planning()
    flat = plan(spec, base)
    clustered = plan(spec, base.model_copy(update={"design_effect": 4.0}))
    assert clustered[0].name == "shadow"
    assert clustered[0].pass_s > 2 * flat[0].pass_s  # four times the variance: ~four times the labels
    assert clustered[0].power_fail_s is not None and flat[0].power_fail_s is not None
    assert clustered[0].power_fail_s > 2 * flat[0].power_fail_s
    # a challenger half a margin worse (acceptable) needs longer than a healthy retrain, and longer again clustered
    assert flat[0].sure_pass_s < flat[0].half_margin_pass_s < clustered[0].half_margin_pass_s
    data = spec.model_dump(exclude_none=True)
    with pytest.raises(SpecError) as caught:
        load_spec({**data, "planning": {**data["planning"], "design_effect": 12}})
    deadline = [p for p in caught.value.problems if p.startswith("phases[1].max_duration_s: an identical")]
    assert deadline and "design effect 12" in deadline[0], caught.value.problems


def _write(directory: Path, frame: pd.DataFrame, schema: object) -> None:
    log = BatchedParquetLog(directory, schema=schema)  # type: ignore[arg-type]
    for row in frame.to_dict("records"):
        log.append(row)
    log.flush()


def test_mlops_rollout_design_effect_reads_the_log_window_and_says_what_to_plan_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    predictions, feedback = _window(rng, 4_000, 100, shared=0.05)
    now = time.time()
    predictions = predictions.assign(ts=now - 60.0, status="ok")
    _write(tmp_path / "prediction-log" / "predictions", predictions, PREDICTION_SCHEMA)
    _write(tmp_path / "prediction-log" / "feedback", feedback.assign(received_at=now - 30.0), FEEDBACK_SCHEMA)
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(app, ["rollout", "design-effect", "--window-s", "600", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {s["signal"] for s in report["signals"]} == {"declines", "fraud labels", "paired log-loss difference",
                                                          "paired recall difference"}  # fmt: skip
    finite = [s["design_effect"] for s in report["signals"] if s["design_effect"] is not None]
    assert report["design_effect"] == max(finite) > 1.5
    empty = runner.invoke(app, ["rollout", "design-effect", "--window-s", "10"])  # the requests are 60 s old
    assert empty.exit_code != 0 and "no requests in the last 10 s" in empty.output


def test_mlops_rollout_plan_takes_a_design_effect_and_refuses_deadlines_too_short_for_it() -> None:
    runner = CliRunner()
    flat = runner.invoke(app, ["rollout", "plan", "--spec", "default", "--json"])
    clustered = runner.invoke(app, ["rollout", "plan", "--spec", "default", "--design-effect", "12", "--json"])
    assert flat.exit_code == 0, flat.output
    assert clustered.exit_code == 1
    shadow = [json.loads(r.stdout.strip().splitlines()[-1])["phases"][0] for r in (flat, clustered)]
    assert shadow[1]["pass_s"] > 5 * shadow[0]["pass_s"]
    problems = json.loads(clustered.stdout.strip().splitlines()[-1])["problems"]
    assert any(p.startswith("phases[1].max_duration_s") and "design effect 12" in p for p in problems), problems
    refused = runner.invoke(app, ["rollout", "plan", "--design-effect", "0.5"])
    assert refused.exit_code != 0 and "design_effect" in refused.output and "must be >= 1" in refused.output


def test_forced_and_degraded_rows_are_not_measured_and_an_unmeasurable_window_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(4)
    predictions, feedback = _window(rng, 2_000, 50, shared=0.05)
    forced = predictions.assign(forced=True)
    assert measure_design_effects(forced, feedback, 0.2) == []
    degraded = predictions.assign(status="degraded")
    assert measure_design_effects(degraded, feedback, 0.2) == []
    # Scores all below the threshold: no decline varies, so its design effect is undefined (JSON null, not NaN)
    now = time.time()
    quiet = predictions.assign(score=0.01, shadow_score=0.01, ts=now - 60.0, status="ok")
    _write(tmp_path / "prediction-log" / "predictions", quiet, PREDICTION_SCHEMA)
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["rollout", "design-effect", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])  # strict JSON: no NaN
    assert report["signals"][0]["signal"] == "declines" and report["signals"][0]["design_effect"] is None
    assert report["design_effect"] == 1.0
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "only-forced"))
    _write(tmp_path / "only-forced" / "prediction-log" / "predictions", quiet.assign(forced=True), PREDICTION_SCHEMA)
    refused = CliRunner().invoke(app, ["rollout", "design-effect"])
    assert refused.exit_code != 0 and "nothing to measure" in refused.output
