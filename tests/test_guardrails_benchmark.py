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
