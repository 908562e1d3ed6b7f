"""`benchmarks/guardrails.py` end to end at a tiny size: whole simulated rollouts through the real state machine
and guardrails. It prints one JSON object in the documented shape, an acceptable challenger (a healthy retrain)
is not rolled back wholesale, and a challenger with 20 % lower recall is caught beyond the spec's tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"rollouts", "rolled_back", "rate", "ci95", "median_labelled_frauds", "median_decision_s"}


def test_benchmark_prints_the_documented_json_and_tells_a_retrain_from_a_recall_drop() -> None:
    command = [sys.executable, "benchmarks/guardrails.py", "--rollouts", "12", "--pool-rows", "30000"]
    command += ["--cases", "identical,recall_drop_20"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "guardrails" and report["rollouts"] == 12
    assert set(report["cases"]) == {"identical", "recall_drop_20"}
    for case in report["cases"].values():
        assert set(case) == {"default", "fast"}
        for by_interval in case.values():
            assert set(by_interval) == {"1", "5", "60"}
            for summary in by_interval.values():
                assert set(summary) == SUMMARY_KEYS and summary["rollouts"] == 12
                low, high = summary["ci95"]
                assert 0 <= low <= summary["rate"] <= high <= 1
    identical, drop = report["cases"]["identical"], report["cases"]["recall_drop_20"]
    # The fast spec's canary deadlines (60 s) leave no look at a 60 s interval: it is judged at 1 s and 5 s only.
    for spec, interval in [("default", "1"), ("default", "5"), ("default", "60"), ("fast", "1"), ("fast", "5")]:
        assert identical[spec][interval]["rate"] <= 0.5, (spec, interval, identical[spec][interval])
    # 20 % lower recall is beyond the default spec's 10 % tolerance (the fast spec tolerates 35 %).
    for interval in ("1", "5", "60"):
        assert drop["default"][interval]["rate"] >= 0.9, (interval, drop["default"][interval])


def _pool_with_slices() -> object:
    """A tiny pool without training: four categories, `fuel` 10 % of payments with few frauds, `travel` 5 % of
    payments with about 10 % of frauds; both models identical, catching every fraud scored 0.5."""
    import numpy as np

    from benchmarks.guardrails import Pool

    rng = np.random.default_rng(0)
    category = np.array(["fuel"] * 1000 + ["travel"] * 500 + ["grocery"] * 6000 + ["electronics"] * 2500)
    fraud_rate = {"fuel": 0.002, "travel": 0.04, "grocery": 0.001, "electronics": 0.06}
    label = (rng.random(len(category)) < np.vectorize(fraud_rate.get)(category)).astype(int)
    score = np.where(label == 1, 0.5, 0.01)
    return Pool(score, score.copy(), label, category, np.ones(len(category)))


def test_slice_case_with_frauds_halves_recall_in_the_category_carrying_about_a_tenth_of_the_frauds() -> None:
    import numpy as np

    from benchmarks.guardrails import THRESHOLD, make_case
    from monitoring.rollout.spec import default_spec

    pool = _pool_with_slices()
    frauds = pool.label == 1  # type: ignore[attr-defined]
    caught = lambda score, where: np.mean(score[frauds & where] >= THRESHOLD)  # noqa: E731
    by_fraud = make_case("slice_recall_halved_frauds", default_spec(), pool, np.random.default_rng(1)).challenger
    by_traffic = make_case("slice_recall_halved", default_spec(), pool, np.random.default_rng(1)).challenger
    travel, fuel = pool.category == "travel", pool.category == "fuel"  # type: ignore[attr-defined]
    # The fraud-share case picks travel (about 10 % of frauds), not fuel (10 % of payments), and halves its recall.
    assert 0.3 <= caught(by_fraud, travel) <= 0.7
    assert caught(by_fraud, ~travel) == 1.0
    # The traffic-share case picks fuel and leaves travel alone.
    assert caught(by_traffic, travel) == 1.0 and caught(by_traffic, ~fuel) == 1.0
