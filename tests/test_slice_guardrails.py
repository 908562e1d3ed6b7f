"""Slice guardrails (recall, decline rate, agreement per merchant category and country) and the business
guardrail (fraud amount caught): a regression confined to one slice is caught and named, in the decision too;
an acceptable challenger's slices do not fail over many simulated rollouts and looks; the error budget counts
them; a spec naming a column the data schema lacks is refused naming the field."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.schema import COUNTRIES, MERCHANT_CATEGORIES
from monitoring.rollout.analysis import to_analysis
from monitoring.rollout.driver import plan_for
from monitoring.rollout.guardrails import (
    FAIL,
    GuardrailResult,
    Levels,
    Observations,
    Pairs,
    error_budget,
    evaluate_guardrails,
    judged_pairs,
    levels_for,
)
from monitoring.rollout.slice_guardrails import (
    SLICE_GUARDRAILS,
    fraud_amount_caught,
    slice_agreement,
    slice_alpha,
    slice_decline_rate,
    slice_keys,
    slice_recall,
)
from monitoring.rollout.spec import RolloutSpec, SpecError, default_spec, fast_spec, load_spec
from monitoring.rollout.state_machine import Analysis, Start, initial_state, step

THRESHOLD = 0.5
FAST = fast_spec()
BY_KIND = {g.kind: g for g in FAST.guardrails}
# Every slice guardrail in shadow and canary, the business one too, fast's margins: to test canary windows.
SPEC = load_spec(
    {
        **FAST.model_dump(exclude={"guardrails"}),
        "phases": [p.model_dump(exclude_none=True) for p in FAST.phases],
        "guardrails": [
            {**g.model_dump(exclude_none=True), "applies_to": list(type(g).SUPPORTED)}
            for g in FAST.guardrails
            if g.kind in SLICE_GUARDRAILS
        ],
    }
)


def traffic(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Requests with the logged slice columns: electronics is ~10 % of traffic and fraud-heavy."""
    share = np.full(len(MERCHANT_CATEGORIES), 0.9 / (len(MERCHANT_CATEGORIES) - 1))
    share[MERCHANT_CATEGORIES.index("electronics")] = 0.1
    category = rng.choice(MERCHANT_CATEGORIES, n, p=share)
    label = rng.random(n) < np.where(category == "electronics", 0.12, 0.03)
    score = np.where(label, rng.beta(3, 2, n), rng.beta(1, 12, n))
    return pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "ts": 1000.0 + np.arange(n) * 0.005,
            "account_id": rng.integers(0, n // 4, n).astype(str),
            "merchant_category": category,
            "country": rng.choice(COUNTRIES, n),
            "amount": rng.lognormal(5.0, 0.8, n),
            "label": label.astype(int),
            "score": score,
        }
    )


def lose_catches(frame: pd.DataFrame, rng: np.random.Generator, where: np.ndarray) -> np.ndarray:
    """The challenger's scores: the champion's, but in `where` 3/4 of the declines fall below the threshold."""
    score = frame["score"].to_numpy()
    lose = where & (score >= THRESHOLD) & (rng.random(len(score)) < 0.75)
    return np.where(lose, 0.6 * THRESHOLD, score)


def shadow_log(frame: pd.DataFrame, challenger: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    predictions = frame.drop(columns="label").assign(
        variant="champion", slot="a", model_version="1", latency_ms=20.0, status="ok", shadow_slot="b",
        shadow_model_version="2", shadow_score=challenger, shadow_latency_ms=30.0, shadow_status="ok",
    )  # fmt: skip
    feedback = frame[["request_id", "label"]].assign(received_at=5000.0)
    return predictions, feedback


def by_name(results: list[GuardrailResult]) -> dict[str, GuardrailResult]:
    return {r.name: r for r in results}


def test_a_recall_regression_confined_to_one_merchant_category_fails_its_slice_and_the_decision_names_it() -> None:
    rng = np.random.default_rng(1)
    frame = traffic(rng, 30_000)
    electronics = (frame["merchant_category"] == "electronics").to_numpy()
    results = evaluate_guardrails(FAST, "shadow", *shadow_log(frame, lose_catches(frame, rng, electronics)),
                                  threshold=THRESHOLD)  # fmt: skip
    found = by_name(results)
    assert found["slice-recall"].verdict == "fail"
    assert found["slice-recall"].slice == "merchant_category=electronics"
    assert "merchant_category=electronics" in found["slice-recall"].detail
    # The whole-traffic recall guardrail (fast tolerates a 35 % drop) does not fail: only the slice sees it.
    assert found["online-recall"].verdict != "fail"

    plan = plan_for(FAST, model_name="m", challenger_version="2", champion_version="1", champion_slot="a",
                    previous_version=None, rollout_id="r")  # fmt: skip
    state = step(plan, initial_state(plan, 0.0), Start(at=0.0))[0]
    for at in (10.0, 11.0):  # failure_limit 2
        state, _ = step(plan, state, Analysis(to_analysis(results, 0, at, samples=len(frame))))
    assert state.status == "rolled_back"
    assert "slice-recall (merchant_category=electronics)" in state.history[-1].reason


def test_a_decline_collapse_in_one_country_fails_slice_decline_rate_naming_the_country() -> None:
    rng = np.random.default_rng(2)
    frame = traffic(rng, 40_000)
    brazil = (frame["country"] == "BR").to_numpy()
    score = frame["score"].to_numpy()
    challenger = np.where(brazil & (score >= THRESHOLD), 0.3 * score, score)  # score_scale_above 0.3 in BR
    found = by_name(evaluate_guardrails(FAST, "shadow", *shadow_log(frame, challenger), threshold=THRESHOLD))
    assert found["slice-decline-rate"].verdict == "fail"
    assert found["slice-decline-rate"].slice == "country=BR"
    assert found["decline-rate"].verdict != "fail"  # one country of twelve: the whole traffic stays in margin


def test_decisions_independent_of_the_champions_in_one_category_fail_slice_agreement() -> None:
    rng = np.random.default_rng(3)
    frame = traffic(rng, 40_000)
    electronics = (frame["merchant_category"] == "electronics").to_numpy()
    score = frame["score"].to_numpy()
    challenger = np.where(electronics, rng.permutation(score), score)
    found = by_name(evaluate_guardrails(FAST, "shadow", *shadow_log(frame, challenger), threshold=THRESHOLD))
    assert found["slice-agreement"].verdict == "fail"
    assert found["slice-agreement"].slice == "merchant_category=electronics"


def test_slices_below_their_minimum_are_not_judged_and_an_unjudged_guardrail_is_inconclusive() -> None:
    rng = np.random.default_rng(4)
    frame = traffic(rng, 300)
    electronics = (frame["merchant_category"] == "electronics").to_numpy()
    found = by_name(evaluate_guardrails(FAST, "shadow", *shadow_log(frame, lose_catches(frame, rng, electronics)),
                                        threshold=THRESHOLD))  # fmt: skip
    assert found["slice-recall"].verdict == "inconclusive"
    assert found["slice-recall"].detail.startswith("0 of 22 slices judged")


def test_fraud_amount_caught_fails_when_the_costliest_frauds_are_missed_though_recall_barely_moves() -> None:
    """The business guardrail: the challenger misses the frauds above EUR 200 (about a third of the frauds, about
    70 % of the fraud amount); its recall drops about a third, which a recall guardrail tolerating 35 % passes
    (fast's tolerated 15 % would catch it; a spec with no planning block may tolerate more)."""
    data = FAST.model_dump(exclude_none=True, exclude={"planning"})
    data["guardrails"] = [{**g, "max_drop": 0.35} if g["name"] == "online-recall" else g for g in data["guardrails"]]
    tolerant = load_spec(data)
    rng = np.random.default_rng(5)
    frame = traffic(rng, 40_000)
    score, amount = frame["score"].to_numpy(), frame["amount"].to_numpy()
    challenger = np.where((amount > 200) & (score >= THRESHOLD), 0.6 * THRESHOLD, score)
    found = by_name(evaluate_guardrails(tolerant, "shadow", *shadow_log(frame, challenger), threshold=THRESHOLD))
    assert found["fraud-amount-caught"].verdict == "fail"
    assert found["fraud-amount-caught"].value < 0.5 * found["fraud-amount-caught"].baseline
    assert found["online-recall"].verdict != "fail"
    healthy = by_name(evaluate_guardrails(FAST, "shadow", *shadow_log(frame, frame["score"].to_numpy()),
                                          threshold=THRESHOLD))  # fmt: skip
    assert healthy["fraud-amount-caught"].verdict == "pass"


def test_in_a_canary_the_slice_and_business_guardrails_compare_the_two_arms() -> None:
    rng = np.random.default_rng(6)
    frame = traffic(rng, 60_000)
    challenger = rng.random(len(frame)) < 0.5
    electronics = (frame["merchant_category"] == "electronics").to_numpy()
    score = np.where(challenger, lose_catches(frame, rng, electronics), frame["score"].to_numpy())
    predictions = frame.drop(columns=["label", "score"]).assign(
        score=score, variant=np.where(challenger, "challenger", "champion"), status="ok", latency_ms=20.0,
        model_version=np.where(challenger, "2", "1"),
    )  # fmt: skip
    feedback = frame[["request_id", "label"]].assign(received_at=5000.0)
    found = by_name(evaluate_guardrails(SPEC, "canary", predictions, feedback, threshold=THRESHOLD))
    assert found["slice-recall"].verdict == "fail" and found["slice-recall"].slice == "merchant_category=electronics"
    assert found["slice-decline-rate"].verdict in ("pass", "fail")  # judged: both arms have their minimum
    assert found["fraud-amount-caught"].verdict in ("inconclusive", "fail")


# ------------------------------------------------------------- many simulated rollouts, many looks


def simulated_pairs(rng: np.random.Generator, n: int, at_margin: bool, regressed: str | None) -> Observations:
    """One simulated shadow window. The challenger's decisions are the champion's on the same request, except:
    at_margin, it keeps only (1 - max_drop) of the champion's catches in every slice (recall exactly at the slice
    recall margin) and declines (1 + max_change) x as often (decline rate exactly at the slice margin); with
    `regressed`, that merchant category loses 3/4 of its catches on top."""
    cat = rng.choice(MERCHANT_CATEGORIES, n)
    country = rng.choice(COUNTRIES, n)
    label = (rng.random(n) < 0.05).astype(float)
    champion = rng.random(n) < np.where(label == 1, 0.8, 0.02)
    challenger = champion.copy()
    if at_margin:
        recall_drop = BY_KIND["slice_recall"].max_drop
        change = BY_KIND["slice_decline_rate"].max_change
        fraud_kept = rng.random(n) < 1 - recall_drop
        challenger = np.where(label == 1, champion & fraud_kept, champion)
        # Legit requests: add declines so the slice's decline rate is (1 + change) x the champion's overall.
        declines, legit = champion.mean(), label == 0
        extra = (change * declines * n + (champion & ~challenger).sum()) / max((legit & ~champion).sum(), 1)
        challenger = challenger | (legit & ~champion & (rng.random(n) < extra))
    if regressed is not None:
        challenger = challenger & ~((cat == regressed) & (rng.random(n) < 0.75))
    scores = np.column_stack([np.where(champion, 0.9, 0.1), np.where(challenger, 0.9, 0.1)])
    return Observations(
        "shadow", None, None,  # type: ignore[arg-type]  # the slice guardrails read the pairs only
        Pairs(scores, label, rng.integers(0, n // 3, n).astype(str), np.zeros((n, 2)), np.zeros(n).astype(str),
              {"merchant_category": cat, "country": country}),
        THRESHOLD,
    )  # fmt: skip


def looks(rng: np.random.Generator, at_margin: bool, regressed: str | None, sizes: tuple[int, ...]) -> list[int]:
    """Verdict codes of the three slice guardrails at growing windows of one stream (each look sees all earlier
    requests): nested prefixes of one simulated window."""
    full = simulated_pairs(rng, sizes[-1], at_margin, regressed)
    codes = []
    for size in sizes:
        p = full.pairs
        assert p is not None
        cut = Pairs(p.scores[:size], p.label[:size], p.account[:size], p.error[:size], p.second[:size],
                    {k: v[:size] for k, v in p.columns.items()})  # fmt: skip
        obs = Observations("shadow", None, None, cut, THRESHOLD)  # type: ignore[arg-type]  # pairs only
        for guardrail in (slice_recall, slice_decline_rate):
            codes.append(FAIL if guardrail(BY_KIND[guardrail.__name__], obs, ALPHA).verdict == "fail" else 0)
    return codes


ALPHA = Levels(0.1, 0.05)  # fail level far above the spec's share, so the false-fail rate is measurable


def test_a_challenger_at_every_slice_margin_fails_no_more_often_than_the_budget_over_many_streams_and_looks() -> None:
    """100 simulated shadow windows of a challenger exactly at the slice recall and decline-rate margins in all
    22 slices, each looked at 4 times as it grows: the share of streams in which any slice ever fails stays
    below the budget (Bonferroni over slices, anytime-valid sequences over looks)."""
    rng = np.random.default_rng(11)
    sizes = (2_000, 5_000, 10_000, 20_000)
    failed = [any(code == FAIL for code in looks(rng, True, None, sizes)) for _ in range(100)]
    assert np.mean(failed) <= ALPHA.fail


def fast_levels() -> Levels:
    """The fast spec's levels for its slice guardrails (each has the same budget weight)."""
    return levels_for(FAST, next(g for g in FAST.guardrails if g.kind == "slice_recall"))


def test_a_slice_halved_is_caught_in_nearly_every_stream_at_the_real_budget() -> None:
    """The same streams with electronics' catches cut by 3/4 (recall 0.8 -> ~0.2, in one slice of 22), at the
    fast spec's real share of the budget: caught (some slice fails) in >= 95 % of 30 streams."""
    global ALPHA
    rng = np.random.default_rng(12)
    saved, ALPHA = ALPHA, fast_levels()
    try:
        caught = [any(code == FAIL for code in looks(rng, False, "electronics", (20_000, 40_000))) for _ in range(30)]
    finally:
        ALPHA = saved
    assert np.mean(caught) >= 0.95


def test_a_healthy_retrain_never_fails_a_slice_over_many_streams() -> None:
    """A challenger whose decisions match the champion's except for symmetric noise (10 % of frauds and 0.5 %
    of legit requests flipped either way, as two trainings differ): no slice fails in 30 streams x 3 looks at
    the spec's budget (the share at the margin is tested above)."""
    rng = np.random.default_rng(13)
    alpha = fast_levels()
    fails = 0
    for _ in range(30):
        obs = simulated_pairs(rng, 30_000, False, None)
        p = obs.pairs
        assert p is not None
        flip = rng.random(len(p.label)) < np.where(p.label == 1, 0.10, 0.005)
        challenger = np.where(flip, 1.0 - p.scores[:, 1], p.scores[:, 1])
        scores = np.column_stack([p.scores[:, 0], challenger])
        for size in (10_000, 20_000, 30_000):
            cut = Pairs(scores[:size], p.label[:size], p.account[:size], p.error[:size], p.second[:size],
                        {k: v[:size] for k, v in p.columns.items()})  # fmt: skip
            window = Observations("shadow", None, None, cut, THRESHOLD)  # type: ignore[arg-type]
            for guardrail in (slice_recall, slice_decline_rate, slice_agreement):
                fails += guardrail(BY_KIND[guardrail.__name__], window, alpha).verdict == "fail"
    assert fails == 0


# ------------------------------------------------------------- budget and spec


def test_slice_guardrails_count_in_the_rollout_budget_and_split_it_over_every_slice_the_schema_has() -> None:
    for spec in (default_spec(), FAST):
        budget = error_budget(spec)
        assert sum(budget[name] for _, name in judged_pairs(spec)) == pytest.approx(spec.false_rollback_rate)
        slice_names = {g.name for g in spec.guardrails if g.kind.startswith("slice_")}
        assert slice_names and all(name in {n for _, n in judged_pairs(spec)} for name in slice_names)
        assert {"slice_recall", "slice_decline_rate", "slice_agreement", "fraud_amount_caught"} <= {
            g.kind for g in spec.guardrails_for("shadow")
        }
    keys = slice_keys(["merchant_category", "country"])
    assert len(keys) == len(MERCHANT_CATEGORIES) + len(COUNTRIES) == 22
    assert slice_alpha(Levels(0.01, 0.05), ["merchant_category", "country"]).fail == pytest.approx(0.01 / 22)


def test_a_slice_column_the_data_schema_lacks_is_refused_at_load_naming_the_field() -> None:
    data = FAST.model_dump(exclude_none=True)
    data["guardrails"] = [
        {"name": "s", "kind": "slice_decline_rate", "applies_to": ["shadow"], "min_samples": 10,
         "slices": ["merchant_category", "merchant_country"]},
    ]  # fmt: skip
    with pytest.raises(SpecError) as error:
        load_spec(data)
    assert "guardrails[0].slices[1]: 'merchant_country' is not a column of the data schema" in str(error.value)
    data["guardrails"][0]["slices"] = ["amount"]
    with pytest.raises(SpecError, match=r"guardrails\[0\].slices\[0\]: 'amount' is not a categorical column"):
        load_spec(data)


def test_business_guardrail_without_labels_or_champion_is_inconclusive() -> None:
    rng = np.random.default_rng(7)
    frame = traffic(rng, 2000)
    predictions, _ = shadow_log(frame, frame["score"].to_numpy())
    found = by_name(evaluate_guardrails(FAST, "shadow", predictions, None, threshold=THRESHOLD))
    assert found["fraud-amount-caught"].verdict == "inconclusive"
    assert "too few samples" in found["fraud-amount-caught"].detail
    assert fraud_amount_caught(BY_KIND["fraud_amount_caught"], Observations("watch", None, None, None, 0.5),  # type: ignore[arg-type]
                               Levels(0.01, 0.05)).verdict == "inconclusive"  # fmt: skip


def test_the_prediction_log_carries_every_column_the_slice_and_business_guardrails_read() -> None:
    from core.prediction_log import PREDICTION_SCHEMA
    from monitoring.rollout.guardrails import SLICE_LOGGED

    spec_columns = {column for g in default_spec().guardrails for column in getattr(g, "slices", [])}
    assert spec_columns <= set(SLICE_LOGGED) <= set(PREDICTION_SCHEMA.names)
    assert "amount" in SLICE_LOGGED


def _with_slice_recall(spec: RolloutSpec, **fields: object) -> RolloutSpec:
    data = spec.model_dump(exclude_none=True)
    data["guardrails"] = [
        {**g, **fields} if g["kind"] == "slice_recall" else g for g in data["guardrails"]
    ]  # fmt: skip
    return load_spec(data)


def test_a_slice_with_its_own_wider_margin_is_not_failed_by_a_drop_within_it() -> None:
    # The same 75 % loss of electronics catches that fails at the guardrail's margin (test above) lies within
    # an own margin of 0.8: a slice where healthy retrains differ that much must not be failed for it.
    rng = np.random.default_rng(1)
    frame = traffic(rng, 30_000)
    electronics = (frame["merchant_category"] == "electronics").to_numpy()
    logged = shadow_log(frame, lose_catches(frame, rng, electronics))
    wide = _with_slice_recall(FAST, max_drop_by_slice={"merchant_category=electronics": 0.8})
    found = by_name(evaluate_guardrails(wide, "shadow", *logged, threshold=THRESHOLD))["slice-recall"]
    assert found.verdict != "fail"
    assert "own margin: >= 0.2 x" in found.detail
    # Another slice's own margin leaves electronics at the guardrail's margin: it still fails.
    other = _with_slice_recall(FAST, max_drop_by_slice={"merchant_category=fuel": 0.8})
    found = by_name(evaluate_guardrails(other, "shadow", *logged, threshold=THRESHOLD))["slice-recall"]
    assert found.verdict == "fail" and found.slice == "merchant_category=electronics"


def test_a_slice_margin_for_an_unknown_slice_or_out_of_range_is_refused_naming_the_field() -> None:
    bad = {"merchant_category=crypto": 0.5, "country=US": 1.2, "merchant_category=fuel": 0.6}
    with pytest.raises(SpecError) as error:
        _with_slice_recall(FAST, slices=["merchant_category", "country"], max_drop_by_slice=bad)
    text = str(error.value)
    assert "max_drop_by_slice.merchant_category=crypto: not a slice of this guardrail's columns" in text
    assert "max_drop_by_slice.country=US: must be in [0, 1), got 1.2" in text
    assert "merchant_category=fuel" not in text.replace("e.g. merchant_category=fuel", "")
    # a slice of a column the guardrail does not judge is refused too
    with pytest.raises(SpecError, match="country=US: not a slice of this guardrail's columns"):
        _with_slice_recall(FAST, slices=["merchant_category"], max_drop_by_slice={"country=US": 0.5})
