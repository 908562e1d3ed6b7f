"""Rollout specs: the shipped specs load, and an invalid spec is refused with every problem at its location."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from monitoring.rollout.spec import (
    GUARDRAIL_KINDS,
    SPECS_DIR,
    RolloutSpec,
    SpecError,
    default_spec,
    fast_spec,
    load_spec,
)

VALID: dict[str, Any] = {
    "name": "test",
    "analysis_interval_s": 1,
    "failure_limit": 2,
    "post_promotion_watch_s": 10,
    "phases": [
        {"name": "shadow", "kind": "shadow", "min_duration_s": 5, "min_samples": 100},
        {"name": "c10", "kind": "canary", "weight": 0.1, "min_duration_s": 5, "min_samples": 100},
        {"name": "c50", "kind": "canary", "weight": 0.5, "min_duration_s": 5, "min_samples": 100},
        {"name": "c100", "kind": "canary", "weight": 1.0, "min_duration_s": 5, "min_samples": 100},
    ],
    "guardrails": [
        {
            "name": "errors",
            "kind": "error_rate",
            "applies_to": ["canary", "watch"],
            "min_samples": 100,
            "max_rate": 0.05,
        },
        {"name": "agreement", "kind": "shadow_agreement", "applies_to": ["shadow"], "min_samples": 100},
    ],
}


def spec_data(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    data.update(changes)
    return data


def problems_of(data: dict[str, Any] | str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(data)
    return caught.value.problems


def test_default_spec_has_replay_then_shadow_then_four_canary_steps_and_every_guardrail_kind() -> None:
    spec = default_spec()
    assert spec == load_spec(SPECS_DIR / "default.yaml")
    assert [(p.kind, p.weight) for p in spec.phases] == [
        ("replay", None),
        ("shadow", None),
        ("canary", 0.05),
        ("canary", 0.25),
        ("canary", 0.5),
        ("canary", 1.0),
    ]
    replay = spec.replay_phase
    assert replay is not None and (replay.requests, replay.min_samples, replay.label_delay_s) == (10000, 2000, 60)
    assert replay.min_duration_s == 0 and replay.on_inconclusive == "advance"
    assert [g.kind for g in spec.guardrails_for("replay")] == [
        "error_rate",
        "score_shift",
        "decline_rate",
        "shadow_agreement",
        "online_recall",
        "online_log_loss",
    ]
    assert spec.phases[1].min_duration_s == 60 and spec.phases[1].min_samples == 500
    assert all(p.min_duration_s == 60 and p.min_samples == 300 for p in spec.canary_phases)
    assert (spec.analysis_interval_s, spec.failure_limit, spec.post_promotion_watch_s) == (5, 2, 120)
    # Every kind judged from the prediction log; `prometheus` needs a server the default cannot assume.
    assert sorted(g.kind for g in spec.guardrails) == sorted(k for k in GUARDRAIL_KINDS if k != "prometheus")
    assert spec.false_rollback_rate == 0.01
    assert all(g.confidence is None for g in spec.guardrails)  # the level comes from the error budget
    assert [g.kind for g in spec.guardrails_for("shadow")] == [
        "score_shift",
        "decline_rate",
        "shadow_agreement",
        "online_recall",
        "online_log_loss",
        "slice_recall",
        "slice_decline_rate",
        "slice_agreement",
        "fraud_amount_caught",
    ]
    assert [g.kind for g in spec.guardrails_for("canary")] == ["error_rate", "latency_p99"]


def test_fast_spec_keeps_the_guardrails_compressed_to_seconds() -> None:
    fast, default = fast_spec(), default_spec()
    assert [p.kind for p in fast.phases] == ["shadow", "canary", "canary", "canary"]
    assert fast.phases[-1].weight == default.phases[-1].weight == 1.0
    assert [(g.name, g.kind) for g in fast.guardrails] == [(g.name, g.kind) for g in default.guardrails]
    for guardrail in fast.guardrails:  # every guardrail still judges shadow or canary, and the watch if it did
        default_phases = next(g for g in default.guardrails if g.name == guardrail.name).applies_to
        assert set(guardrail.applies_to) <= set(default_phases)
        assert {"shadow", "canary"} & set(guardrail.applies_to)
        assert ("watch" in guardrail.applies_to) == ("watch" in default_phases)
    assert fast.false_rollback_rate == default.false_rollback_rate == 0.01
    assert all(4 <= p.min_duration_s <= 10 for p in fast.phases)
    assert max(p.min_samples for p in fast.phases) < min(p.min_samples for p in default.phases)
    assert fast.post_promotion_watch_s < default.post_promotion_watch_s


def test_spec_loads_from_path_path_string_yaml_text_and_mapping() -> None:
    path = SPECS_DIR / "fast.yaml"
    assert load_spec(path) == load_spec(str(path)) == load_spec(path.read_text()) == fast_spec()
    assert load_spec(yaml.safe_load(path.read_text())) == fast_spec()


def test_weight_out_of_range_is_reported_at_its_phase() -> None:
    data = spec_data()
    data["phases"][2]["weight"] = 1.5
    assert problems_of(data) == ["phases[2].weight: must be in (0, 1], got 1.5"]


def test_canary_weights_must_increase_strictly() -> None:
    data = spec_data()
    data["phases"][2]["weight"] = 0.1
    assert problems_of(data) == [
        "phases[2].weight: must be greater than phases[1].weight (0.1): canary weights increase strictly"
    ]


def test_shadow_phase_must_come_first_and_has_no_weight() -> None:
    data = spec_data()
    data["phases"][0], data["phases"][1] = data["phases"][1], data["phases"][0]
    data["phases"][1]["weight"] = 0.05
    assert problems_of(data) == [
        "phases[1].kind: only the first phase (or the one after replay) may be shadow",
        "phases[1].weight: only canary phases have a weight",
    ]


def test_canary_phase_needs_a_weight() -> None:
    data = spec_data()
    del data["phases"][1]["weight"]
    assert problems_of(data) == ["phases[1].weight: required for a canary phase, in (0, 1]"]


def test_every_problem_is_listed_at_once_with_its_location() -> None:
    data = spec_data(analysis_interval_s=0, failure_limit=0, post_promotion_watch_s=-1)
    data["phases"][1]["min_samples"] = 0
    data["phases"][2]["min_duration_s"] = -5
    data["phases"][3]["weight"] = 0.4  # not above phases[2]: reported even though other fields are invalid
    data["phases"][3]["min_sample"] = 3  # a typo
    data["guardrails"][1]["confidence"] = 1.5
    del data["guardrails"][0]["min_samples"]
    with pytest.raises(SpecError) as caught:
        load_spec(data)
    error = caught.value
    assert error.problems == [
        "phases[1].min_samples: must be >= 1, got 0",
        "phases[2].min_duration_s: must be >= 0, got -5.0",
        "phases[3].min_sample: unknown field",
        "phases[3].weight: must be greater than phases[2].weight (0.5): canary weights increase strictly",
        "analysis_interval_s: must be > 0, got 0.0",
        "failure_limit: must be >= 1, got 0",
        "post_promotion_watch_s: must be >= 0, got -1.0",
        "guardrails[0].min_samples: required",
        "guardrails[1].confidence: must be in [0.5, 1), got 1.5",
    ]
    assert isinstance(error, ValueError)
    assert "(9 problems)" in str(error)
    assert "  - phases[1].min_samples: must be >= 1, got 0" in str(error)


def test_guardrail_names_must_be_unique() -> None:
    data = spec_data()
    data["guardrails"][1]["name"] = "errors"
    assert problems_of(data) == ["guardrails[1].name: duplicate guardrail name 'errors' (also guardrails[0])"]


def test_unknown_or_missing_guardrail_kind_names_the_choices() -> None:
    data = spec_data()
    data["guardrails"][0]["kind"] = "accuracy"
    del data["guardrails"][1]["kind"]
    first, second = problems_of(data)
    assert first.startswith("guardrails[0].kind: must be one of error_rate, latency_p99,") and "'accuracy'" in first
    assert second.startswith("guardrails[1].kind: required, one of error_rate")


def test_guardrail_field_errors_are_located_without_the_union_tag() -> None:
    data = spec_data()
    data["guardrails"][0]["max_increase"] = -0.1
    data["guardrails"][1]["min_decline_overlap"] = 1.2
    assert problems_of(data) == [
        "guardrails[0].max_increase: must be in [0, 1), got -0.1",
        "guardrails[1].min_decline_overlap: must be in (0, 1), got 1.2",
    ]


@pytest.mark.parametrize("budget", [0, -0.01, 0.5])
def test_an_impossible_error_budget_is_refused_with_its_field(budget: float) -> None:
    assert problems_of(spec_data(false_rollback_rate=budget)) == [
        f"false_rollback_rate: must be in (0, 0.5), got {float(budget)}: an error budget <= 0 cannot be guaranteed"
    ]


def test_watch_needs_the_guardrails_absolute_bound() -> None:
    data = spec_data()
    del data["guardrails"][0]["max_rate"]
    assert problems_of(data) == [
        "guardrails[0].max_rate: required when applies_to includes 'watch' (the bound a promoted champion keeps)"
    ]


def test_guardrail_cannot_apply_to_a_phase_it_cannot_measure() -> None:
    data = spec_data()
    data["guardrails"][1]["applies_to"] = ["shadow", "canary"]
    data["guardrails"].append(
        {"name": "p99", "kind": "latency_p99", "applies_to": ["shadow", "canary"], "min_samples": 100}
    )
    assert problems_of(data) == [
        "guardrails[1].applies_to[1]: shadow_agreement cannot apply to 'canary' (only the replay and shadow phases "
        "score the same requests with both models); supported: replay, shadow",
        "guardrails[2].applies_to[0]: latency_p99 cannot apply to 'shadow' (replay and shadow latency is measured "
        "per batch, not per request); supported: canary, watch",
    ]


def test_at_least_one_phase_and_one_guardrail_are_required() -> None:
    assert problems_of(spec_data(phases=[], guardrails=[])) == [
        "phases: at least one phase is required",
        "guardrails: at least one guardrail is required",
    ]


def test_missing_top_level_fields_and_wrong_types_are_reported() -> None:
    data = spec_data(failure_limit="two")
    del data["name"]
    assert problems_of(data) == [
        "name: required",
        "failure_limit: Input should be a valid integer, unable to parse string as an integer, got 'two'",
    ]


def test_yaml_syntax_error_names_the_line() -> None:
    (problem,) = problems_of("name: x\nphases: [\n")
    assert problem.startswith("line 3, column 1: not valid YAML")


def test_a_spec_that_is_not_a_mapping_is_refused() -> None:
    assert problems_of("- just\n- a list\n") == ["<spec>: must be a YAML mapping, got list"]


def test_missing_file_is_reported_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=r"nope\.yaml") as caught:
        load_spec(missing)
    assert caught.value.problems[0].startswith("<file>: cannot read")


def test_constructing_the_model_directly_applies_the_same_cross_field_rules() -> None:
    data = spec_data()
    data["phases"][3]["weight"] = 0.5
    with pytest.raises(pydantic.ValidationError, match=r"phases\[3\]\.weight: must be greater"):
        RolloutSpec.model_validate(data)


def test_a_loaded_spec_is_immutable() -> None:
    spec = load_spec(VALID)
    with pytest.raises(pydantic.ValidationError):
        spec.failure_limit = 5  # type: ignore[misc]


def test_a_phase_deadline_shorter_than_its_minimum_duration_is_refused_with_its_location() -> None:
    data = spec_data()
    data["phases"][0] = {**data["phases"][0], "max_duration_s": data["phases"][0]["min_duration_s"] / 2}
    assert any(p.startswith("phases[0]") and "max_duration_s" in p for p in problems_of(data))


def test_every_shipped_phase_has_a_progress_deadline() -> None:
    for spec in (default_spec(), fast_spec()):
        assert all(p.max_duration_s is not None and p.max_duration_s >= p.min_duration_s for p in spec.phases)


def test_failures_while_paused_default_to_rollback_and_a_spec_can_hold_them_for_the_person_who_paused() -> None:
    from monitoring.rollout.driver import plan_for

    assert load_spec(spec_data()).on_failure_while_paused == "rollback"
    held = load_spec(spec_data(on_failure_while_paused="hold"))
    assert plan_for(held, "fraud", "2", "1", "a", None).on_failure_while_paused == "hold"
    assert any(p.startswith("on_failure_while_paused") for p in problems_of(spec_data(on_failure_while_paused="no")))
