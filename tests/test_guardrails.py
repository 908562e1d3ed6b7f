"""Guardrails on synthetic prediction logs (numpy-generated, no mocks): each one passes an identical challenger,
fails a clearly worse one, stays inconclusive below its sample minimum, and fails an identical challenger in
fewer than 5 % of 200 simulated rollouts. The statistical cores are checked for their level and power.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from monitoring.rollout.guardrails import (
    GUARDRAILS,
    GuardrailResult,
    evaluate_guardrails,
    observe,
    overall_verdict,
    population_stability_index,
    ratio_margin_test,
    required_labelled_frauds,
    two_proportion_margin_test,
)
from monitoring.rollout.spec import default_spec, load_spec

SPEC = default_spec()

# These tests were written for a threshold of 0.5; the live one comes from Settings (MLOPS_DECISION_THRESHOLD).
THRESHOLD = 0.5
RELATIVE = ("error-rate", "latency-p99", "score-shift", "online-recall", "online-log-loss")


def canary_log(
    rng: np.random.Generator,
    n_champion: int = 1500,
    n_challenger: int = 1500,
    *,
    champion_errors: float = 0.01,
    challenger_errors: float = 0.01,
    slower: float = 1.0,
    shift: float = 0.0,
    challenger_noise: bool = False,
    fraud_rate: float = 0.2,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A canary window as the gateway logs it, and labels for every request.

    Scores: frauds ~ Beta(3, 2) (recall at 0.5 is 0.69), others ~ Beta(1, 12). A failed challenger request is
    logged as the gateway does: variant "champion", status "fallback", with the champion's score.
    """
    n = n_champion + n_challenger
    challenger = np.arange(n) >= n_champion
    label = rng.random(n) < fraud_rate
    score = np.where(label, rng.beta(3, 2, n), rng.beta(1, 12, n))
    score = np.clip(score + shift * challenger, 0, 1)
    if challenger_noise:
        score = np.where(challenger, rng.random(n), score)
    failed = rng.random(n) < np.where(challenger, challenger_errors, champion_errors)
    status = np.where(failed, np.where(challenger, "fallback", "error"), "ok")
    variant = np.where(challenger & ~failed, "challenger", "champion")
    ids = np.array([f"r{i}" for i in range(n)])
    predictions = pd.DataFrame(
        {
            "request_id": ids,
            "ts": 1000.0 + np.arange(n) * 0.01,
            "account_id": rng.integers(0, 500, n).astype(str),
            "variant": variant,
            "slot": np.where(challenger & ~failed, "b", "a"),
            "model_version": np.where(challenger & ~failed, "2", "1"),
            "score": np.where(status == "error", np.nan, score),
            "latency_ms": rng.lognormal(np.log(20), 0.35, n) * np.where(challenger, slower, 1.0),
            "status": status,
            "policy_generation": 3,
        }
    )
    feedback = pd.DataFrame({"request_id": ids, "label": label.astype(int), "received_at": 2000.0})
    return predictions, feedback


def shadow_log(
    rng: np.random.Generator, n: int = 2000, *, flipped: float = 0.0, shadow_errors: float = 0.0, dropped: float = 0.0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A shadow window: champion rows whose shadow_* columns hold the challenger's answer on the same request;
    `flipped` of the shadow scores are mirrored (1 - score), which reverses the decision."""
    predictions, feedback = canary_log(rng, n, 0, champion_errors=0.0)
    score = predictions["score"].to_numpy()
    flip = rng.random(n) < flipped
    shadow_status = np.where(rng.random(n) < dropped, "dropped", np.where(rng.random(n) < shadow_errors, "error", "ok"))
    ok = shadow_status == "ok"
    predictions = predictions.assign(
        shadow_slot="b",
        shadow_model_version=np.where(ok, "2", None),
        shadow_score=np.where(ok, np.where(flip, 1 - score, score), np.nan),
        shadow_latency_ms=np.where(shadow_status == "dropped", np.nan, 35.0),
        shadow_status=shadow_status,
    )
    return predictions, feedback


def by_name(results: list[GuardrailResult]) -> dict[str, GuardrailResult]:
    return {result.name: result for result in results}


def canary(predictions: pd.DataFrame, feedback: pd.DataFrame | None) -> dict[str, GuardrailResult]:
    return by_name(evaluate_guardrails(SPEC, "canary", predictions, feedback, threshold=THRESHOLD))


def labelled_recall_log(n_frauds: int, champion_recall: float, challenger_recall: float) -> tuple[pd.DataFrame, ...]:
    """Exactly `n_frauds` labelled frauds per variant, caught (score 0.8) at exactly the given recall."""
    rows = []
    for variant, recall in (("champion", champion_recall), ("challenger", challenger_recall)):
        caught = round(recall * n_frauds)
        scores = [0.8] * caught + [0.2] * (n_frauds - caught) + [0.05] * 300  # plus some labelled legit requests
        labels = [1] * n_frauds + [0] * 300
        rows += [(variant, s, y) for s, y in zip(scores, labels, strict=True)]
    frame = pd.DataFrame(rows, columns=["variant", "score", "label"])
    frame["request_id"] = [f"r{i}" for i in range(len(frame))]
    predictions = frame.assign(status="ok", latency_ms=20.0).drop(columns="label")
    return predictions, frame[["request_id", "label"]].assign(received_at=0.0)


# ------------------------------------------------------------------------------------------- canary


def test_identical_challenger_passes_every_canary_guardrail() -> None:
    results = canary(*canary_log(np.random.default_rng(1)))
    assert {name: r.verdict for name, r in results.items()} == dict.fromkeys(RELATIVE, "pass")
    assert overall_verdict(list(results.values())) == "pass"


def test_challenger_with_ten_percent_errors_fails_error_rate() -> None:
    result = canary(*canary_log(np.random.default_rng(2), challenger_errors=0.10))["error-rate"]
    assert result.verdict == "fail"
    assert result.value == pytest.approx(0.10, abs=0.02) and result.baseline == pytest.approx(0.01, abs=0.01)
    assert result.p_value is not None and result.p_value < 1e-6
    assert "two-proportion z-test" in result.test and result.limit == 0.01


def test_fallback_rows_count_as_challenger_errors_without_their_champion_score() -> None:
    predictions, feedback = canary_log(np.random.default_rng(3), challenger_errors=0.10)
    fallbacks = int((predictions["status"] == "fallback").sum())
    obs = observe("canary", predictions, feedback, threshold=THRESHOLD)
    assert obs.candidate.requests == 1500 and int(obs.candidate.error.sum()) == fallbacks
    assert np.isnan(obs.candidate.score[obs.candidate.error]).all()
    assert obs.baseline is not None and obs.baseline.requests + obs.candidate.requests == len(predictions)


def test_three_times_slower_challenger_fails_latency_p99() -> None:
    result = canary(*canary_log(np.random.default_rng(4), slower=3.0))["latency-p99"]
    assert result.verdict == "fail"
    assert result.value is not None and result.baseline is not None and result.value > 2.5 * result.baseline
    assert "exact binomial" in result.test and result.limit == 0.02


def test_shifted_scores_fail_score_shift() -> None:
    result = canary(*canary_log(np.random.default_rng(5), shift=0.15))["score-shift"]
    assert result.verdict == "fail"
    assert result.value is not None and result.value > 0.2 and result.p_value is not None and result.p_value < 0.05


def test_a_trivial_shift_on_a_huge_sample_does_not_fail_score_shift() -> None:
    """KS alone would reject (p tiny at 20,000 scores per side); the PSI effect size keeps it from failing."""
    result = canary(*canary_log(np.random.default_rng(6), 20_000, 20_000, shift=0.003))["score-shift"]
    assert result.p_value is not None and result.p_value < 0.05
    assert result.verdict == "pass" and result.value is not None and result.value < 0.2


def test_challenger_with_twenty_percent_lower_recall_fails_online_recall() -> None:
    result = canary(*labelled_recall_log(1000, 0.60, 0.48))["online-recall"]
    assert (result.verdict, result.value, result.baseline, result.samples) == ("fail", 0.48, 0.60, 1000)
    assert result.p_value is not None and result.p_value < 0.05


def test_recall_within_the_allowed_drop_passes_online_recall() -> None:
    result = canary(*labelled_recall_log(1000, 0.60, 0.57))["online-recall"]
    assert result.verdict == "pass"


def test_uninformative_challenger_fails_online_log_loss() -> None:
    result = canary(*canary_log(np.random.default_rng(7), challenger_noise=True))["online-log-loss"]
    assert result.verdict == "fail"
    assert result.value is not None and result.baseline is not None and result.value > 1.1 * result.baseline
    assert "Welch" in result.test


def test_below_min_samples_every_guardrail_is_inconclusive_even_for_a_broken_challenger() -> None:
    predictions, feedback = canary_log(
        np.random.default_rng(8), 250, 250, challenger_errors=0.5, slower=5.0, shift=0.3, challenger_noise=True
    )
    results = canary(predictions, feedback)
    assert {name: r.verdict for name, r in results.items()} == dict.fromkeys(RELATIVE, "inconclusive")
    assert all("too few samples" in r.detail for r in results.values())
    assert overall_verdict(list(results.values())) == "inconclusive"


def test_labelled_guardrails_wait_for_feedback() -> None:
    predictions, _ = canary_log(np.random.default_rng(9))
    results = canary(predictions, None)
    assert results["online-recall"].verdict == results["online-log-loss"].verdict == "inconclusive"
    assert results["online-recall"].samples == 0


def test_latest_feedback_per_request_wins() -> None:
    predictions, feedback = labelled_recall_log(1000, 0.6, 0.48)
    # a corrected label arriving later: every challenger fraud was in fact legitimate
    challenger_ids = predictions.loc[predictions["variant"] == "challenger", "request_id"]
    corrected = pd.DataFrame({"request_id": challenger_ids, "label": 0, "received_at": 1.0})
    result = canary(predictions, pd.concat([corrected, feedback.assign(received_at=0.5)]))["online-recall"]
    assert result.verdict == "inconclusive" and result.samples == 0


def test_canary_at_full_weight_holds_the_challenger_to_the_absolute_bounds() -> None:
    predictions, feedback = canary_log(np.random.default_rng(10), 0, 1500, challenger_errors=0.10)
    results = canary(predictions, feedback)
    assert results["error-rate"].verdict == "fail" and "exact binomial" in results["error-rate"].test
    assert results["error-rate"].limit == 0.02
    assert "score-shift" not in results  # no absolute bound for a shift, and no champion scores to compare with


def test_a_healthy_challenger_can_pass_the_full_weight_step() -> None:
    """Purely relative guardrails are left out at 100 %, so they cannot block the last step forever."""
    predictions, feedback = canary_log(np.random.default_rng(11), 0, 12000, challenger_errors=0.0, fraud_rate=0.02)
    results = canary(predictions, feedback)
    assert set(results) == {"error-rate", "latency-p99", "online-recall", "online-log-loss"}
    assert results["error-rate"].verdict == "pass"
    assert all(r.verdict == "pass" for r in results.values()), {n: r.detail for n, r in results.items()}


# ------------------------------------------------------------------------------------------- shadow


def test_identical_shadow_challenger_passes_and_dropped_shadow_calls_are_not_its_errors() -> None:
    results = by_name(
        evaluate_guardrails(SPEC, "shadow", *shadow_log(np.random.default_rng(11), dropped=0.2), threshold=THRESHOLD)
    )
    assert set(results) == {"error-rate", "score-shift", "shadow-agreement", "online-recall", "online-log-loss"}
    assert {r.verdict for r in results.values()} == {"pass"}
    assert results["shadow-agreement"].value == 1.0
    assert results["error-rate"].value == 0.0


def test_seventy_percent_agreement_fails_shadow_agreement() -> None:
    results = by_name(
        evaluate_guardrails(SPEC, "shadow", *shadow_log(np.random.default_rng(12), flipped=0.3), threshold=THRESHOLD)
    )
    result = results["shadow-agreement"]
    assert result.verdict == "fail" and result.value == pytest.approx(0.70, abs=0.03)
    assert result.p_value is not None and result.p_value < 1e-10


def test_shadow_agreement_is_inconclusive_below_min_samples() -> None:
    results = by_name(
        evaluate_guardrails(
            SPEC, "shadow", *shadow_log(np.random.default_rng(13), 400, flipped=0.3), threshold=THRESHOLD
        )
    )
    assert results["shadow-agreement"].verdict == "inconclusive" and results["shadow-agreement"].samples == 400


def test_shadow_errors_fail_error_rate() -> None:
    predictions, feedback = shadow_log(np.random.default_rng(14), shadow_errors=0.10)
    assert (
        by_name(evaluate_guardrails(SPEC, "shadow", predictions, feedback, threshold=THRESHOLD))["error-rate"].verdict
        == "fail"
    )


# -------------------------------------------------------------------------------------------- watch


def test_watch_holds_the_promoted_champion_to_absolute_bounds() -> None:
    rng = np.random.default_rng(15)
    healthy, feedback = canary_log(rng, 12_000, 0, champion_errors=0.0, fraud_rate=0.02)  # ~240 labelled frauds
    results = by_name(evaluate_guardrails(SPEC, "watch", healthy, feedback, threshold=THRESHOLD))
    assert set(results) == {"error-rate", "latency-p99", "online-recall", "online-log-loss"}
    assert {r.verdict for r in results.values()} == {"pass"}, results
    assert all(r.baseline is None for r in results.values())
    assert results["latency-p99"].limit == 250 and "exact binomial" in results["latency-p99"].test
    broken, _ = canary_log(rng, 3000, 0, champion_errors=0.10)
    broken = broken.assign(latency_ms=broken["latency_ms"] * 20)
    results = by_name(evaluate_guardrails(SPEC, "watch", broken, None, threshold=THRESHOLD))
    assert results["error-rate"].verdict == results["latency-p99"].verdict == "fail"
    assert results["online-recall"].verdict == "inconclusive"  # no labels yet


def test_results_serialise_to_plain_dicts() -> None:
    result = canary(*canary_log(np.random.default_rng(17)))["error-rate"]
    data = json.loads(json.dumps(result.to_dict()))
    assert data["name"] == "error-rate" and data["verdict"] == "pass" and isinstance(data["value"], float)
    assert set(data) == {
        "name",
        "verdict",
        "value",
        "baseline",
        "limit",
        "samples",
        "min_samples",
        "test",
        "confidence",
        "p_value",
        "detail",
    }


def test_unknown_phase_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="phase_kind"):
        evaluate_guardrails(SPEC, "blue-green", *canary_log(np.random.default_rng(18), 10, 10), threshold=THRESHOLD)


def test_registry_covers_every_guardrail_kind() -> None:
    assert set(GUARDRAILS) == {g.kind for g in SPEC.guardrails}


# ----------------------------------------------------------------------------- false fails and power


def test_identical_challenger_fails_fewer_than_five_percent_of_200_rollouts() -> None:
    rng = np.random.default_rng(2024)
    fails = dict.fromkeys(RELATIVE, 0)
    passes = dict.fromkeys(RELATIVE, 0)
    for _ in range(200):
        for name, result in canary(*canary_log(rng, 1200, 1200, fraud_rate=0.3)).items():
            fails[name] += result.verdict == "fail"
            passes[name] += result.verdict == "pass"
    assert all(fails[name] / 200 < 0.05 for name in RELATIVE), fails
    assert all(passes[name] / 200 > 0.5 for name in RELATIVE), passes  # the tests decide; they are not idle


def test_margin_free_tests_hold_their_level() -> None:
    """With no margin, an identical challenger is rejected at about 1 - confidence (20,000 simulated runs)."""
    rng = np.random.default_rng(7)
    n = 2000
    x_c, x_b = rng.binomial(n, 0.02, 20_000), rng.binomial(n, 0.02, 20_000)
    _, p, _ = two_proportion_margin_test(x_c, n, x_b, n, margin=0.0, confidence=0.95)
    assert 0.02 < np.mean(p < 0.05) < 0.065
    k_c, k_b = rng.binomial(300, 0.6, 20_000), rng.binomial(300, 0.6, 20_000)
    _, p = ratio_margin_test(k_c, 300, k_b, 300, max_drop=0.0)
    assert 0.02 < np.mean(p < 0.05) < 0.065


def test_required_labelled_frauds_gives_the_stated_power() -> None:
    n = required_labelled_frauds(0.6, 0.2)
    assert n == 211  # per variant, to see 0.60 -> 0.48 with a one-sided 95 % test at 80 % power
    rng = np.random.default_rng(11)
    k_b, k_c = rng.binomial(n, 0.6, 20_000), rng.binomial(n, 0.48, 20_000)
    _, p = ratio_margin_test(k_c, n, k_b, n, max_drop=0.0)
    assert np.mean(p < 0.05) == pytest.approx(0.8, abs=0.04)
    # the default guardrail tolerates a 10 % drop, so seeing a 20 % drop past that margin takes more labels
    with_margin = required_labelled_frauds(0.6, 0.2, margin=0.1)
    assert with_margin > 3 * n
    k_b, k_c = rng.binomial(with_margin, 0.6, 20_000), rng.binomial(with_margin, 0.48, 20_000)
    _, p = ratio_margin_test(k_c, with_margin, k_b, with_margin, max_drop=0.1)
    assert np.mean(p < 0.05) == pytest.approx(0.8, abs=0.04)
    with pytest.raises(ValueError, match="relative_drop"):
        required_labelled_frauds(0.6, 0.05, margin=0.1)


def test_population_stability_index_is_zero_for_the_same_scores_and_grows_with_the_shift() -> None:
    scores = np.random.default_rng(19).beta(1, 12, 5000)
    assert population_stability_index(scores, scores) == pytest.approx(0.0)
    assert population_stability_index(scores, scores + 0.02) < population_stability_index(scores, scores + 0.1)
    point_mass = np.r_[np.zeros(4000), scores[:1000]]  # tied quantiles merge into fewer bins
    assert population_stability_index(point_mass, point_mass) == pytest.approx(0.0)


def test_a_custom_spec_evaluates_only_the_guardrails_for_the_phase() -> None:
    spec = load_spec(
        {
            "name": "one",
            "analysis_interval_s": 1,
            "failure_limit": 1,
            "post_promotion_watch_s": 0,
            "phases": [{"name": "c", "kind": "canary", "weight": 1.0, "min_duration_s": 0, "min_samples": 1}],
            "guardrails": [{"name": "e", "kind": "error_rate", "applies_to": ["canary"], "min_samples": 50}],
        }
    )
    predictions, feedback = canary_log(np.random.default_rng(20), 500, 500)
    assert [r.name for r in evaluate_guardrails(spec, "canary", predictions, feedback, threshold=THRESHOLD)] == ["e"]
    assert evaluate_guardrails(spec, "shadow", predictions, feedback, threshold=THRESHOLD) == []
