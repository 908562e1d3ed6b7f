"""`mlops demo` exits 1 and names what it failed to show; the whole demo itself runs in `make demo`."""

from __future__ import annotations

from typing import Any

from mlops.demo import demo_problems


def good_record() -> dict[str, Any]:
    return {
        "runs": [
            {"label": "first champion", "status": "SUCCEEDED"},
            {"label": "challenger", "status": "SUCCEEDED"},
        ],
        "rollouts": [
            {"label": "guarded rollout of the retrained model", "outcome": "promoted"},
            {"label": "rollback scenario: latency-regression", "outcome": "rolled_back"},
        ],
        "scenario": {"name": "latency-regression", "passed": True, "failures": []},
    }


def test_a_demo_that_showed_a_promotion_and_a_rollback_has_no_problems() -> None:
    assert demo_problems(good_record()) == []


def test_a_guardrail_rolling_back_the_retrained_model_is_a_decision_not_a_problem() -> None:
    record = good_record()
    record["rollouts"][0]["outcome"] = "rolled_back"
    assert demo_problems(record) == []


def test_each_failure_is_named() -> None:
    record = good_record()
    record["runs"][1] = {"label": "challenger", "status": "FAILED", "failed_step": "validate", "reason": "2 failed"}
    record["rollouts"][0]["outcome"] = "undecided (canary)"
    record["scenario"] = {"name": "latency-regression", "passed": False, "failures": ["outcome promoted"]}
    problems = demo_problems(record)
    assert problems == [
        "challenger: pipeline FAILED at validate: 2 failed",
        "guarded rollout of the retrained model: undecided (canary), no decision in time",
        "rollback scenario latency-regression: outcome promoted",
    ]


def test_a_demo_stopped_by_an_error_says_so_and_what_never_ran() -> None:
    record = {"error": "RuntimeError: the first training run failed", "runs": [], "rollouts": []}
    assert demo_problems(record) == [
        "stopped early: RuntimeError: the first training run failed",
        "the retrained model's guarded rollout did not run",
        "the rollback scenario did not run",
    ]
