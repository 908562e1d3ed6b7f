"""The oracle bound of `benchmarks/slice_power.py`: the most powerful test of a slice's recall halving, which the
README uses to show that no valid slice test can catch `slice_recall_halved` (fuel) within the shadow deadline."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from benchmarks.slice_power import frauds_to_fail, oracle_power, oracle_seconds_for, poisson_counts
from monitoring.rollout.spec import spec_from_setting


def _exactly(count: int) -> np.ndarray:
    caught = np.zeros(count + 1)
    caught[count] = 1.0
    return caught


def _binomial_test_power(count: int, margin: float, alpha: float, halved: float = 0.5) -> float:
    """Written apart from the code under test: with a fixed count the likelihood ratio falls as X rises, so the
    most powerful test rejects X < c, and X = c with the probability that makes its size exactly alpha."""
    null = stats.binom(count, 1.0 - margin)
    c = 0
    while null.cdf(c) <= alpha:
        c += 1
    below = null.cdf(c - 1) if c else 0.0
    gamma = (alpha - below) / null.pmf(c)
    alternative = stats.binom(count, halved)
    return float((alternative.cdf(c - 1) if c else 0.0) + gamma * alternative.pmf(c))


@pytest.mark.parametrize(("count", "alpha"), [(18, 0.01), (18, 0.05), (60, 0.01), (150, 0.0001)])
def test_oracle_power_equals_the_randomised_binomial_test_at_a_fixed_count(count: int, alpha: float) -> None:
    assert oracle_power(_exactly(count), 0.3, alpha) == pytest.approx(_binomial_test_power(count, 0.3, alpha), abs=1e-9)


def test_oracle_power_is_its_size_when_the_alternative_nears_the_null() -> None:
    # An unbiased most powerful test: power >= alpha, and -> alpha as P1 -> P0.
    power = oracle_power(poisson_counts(40.0), 0.3, 0.05, halved=0.6999)
    assert 0.05 <= power < 0.0505


def test_oracle_power_grows_with_the_evidence_and_reaches_one() -> None:
    powers = [oracle_power(poisson_counts(mean), 0.3, 0.01) for mean in (5, 20, 80, 320)]
    assert powers == sorted(powers)
    assert powers[0] < 0.1 and powers[-1] > 0.999


def test_oracle_seconds_for_80_percent_is_where_the_power_crosses_it() -> None:
    seconds = oracle_seconds_for(0.8, 0.01, 0.3, 0.01)
    assert oracle_power(poisson_counts(0.01 * seconds), 0.3, 0.01) >= 0.8
    assert oracle_power(poisson_counts(0.01 * seconds * 0.97), 0.3, 0.01) < 0.8


def test_the_real_slice_guardrail_never_beats_the_oracle() -> None:
    # Walks through the real judge at the default spec, with a fixed number of labelled slice frauds: the share
    # that has failed by then cannot exceed the most powerful single-look test's power at the whole budget.
    spec = spec_from_setting("default")
    margin = next(c for c in spec.guardrails if c.kind == "slice_recall").max_drop
    recall, rng = 0.3, np.random.default_rng(7)
    k = 1 - margin
    d = rng.choice([k - 1, k, 0.0], size=50_000, p=[recall / 2, recall / 2, 1 - recall])
    first = frauds_to_fail(d, "default", 300, rng)
    for frauds in (400, 700, 1000):
        real = float(np.mean(first <= frauds))
        caught = stats.binom.pmf(np.arange(frauds + 1), frauds, recall)
        assert real <= oracle_power(caught, margin, spec.false_rollback_rate) + 0.05  # 300 walks: a few % noise


def test_oracle_refuses_a_margin_that_the_halving_does_not_exceed() -> None:
    with pytest.raises(ValueError, match="margin must lie"):
        oracle_power(_exactly(10), 0.5, 0.01)


@pytest.mark.slow
def test_the_bundled_specs_own_slice_margins_cover_the_drop_between_healthy_retrains() -> None:
    # Four retrains of the benchmark's recipe on a million-row pool (the README's figures use 8 on 3 million):
    # no healthy retrain may be more than its slice's margin below another, in any slice of either bundled spec.
    from benchmarks.slice_power import retrain_spread

    spread = retrain_spread(4, 1_000_000)
    for spec in (spec_from_setting("default"), spec_from_setting("fast")):
        cfg = next(c for c in spec.guardrails if c.kind == "slice_recall")
        for key, row in spread.items():
            ratio_min = min(pair[0] for pair in row["pairs"])
            assert 1 - ratio_min <= cfg.drop_for(key), (spec.name, key, ratio_min)
