"""The demo report and the rollout timeline: pure functions over a record, rendered for real (plotly, matplotlib)."""

from __future__ import annotations

from pathlib import Path

from mlops.report import render_png, render_report
from mlops.timeline import sample, weight_of, with_decisions

PLAN = {"phases": [{"name": "shadow", "weight": 0.0}, {"name": "canary-10", "weight": 0.1}]}


def view(status: str, index: int) -> dict:
    return {"rollout_id": "r1", "state": {"status": status, "phase_index": index}, "plan": PLAN}


def test_the_challengers_live_share_follows_the_phase_and_the_promotion() -> None:
    assert weight_of(view("shadow", 0)) == 0.0
    assert weight_of(view("canary", 1)) == 0.1
    assert weight_of(view("promoted_watching", 2)) == 1.0
    assert weight_of(view("rolled_back", 1)) == 0.0


def test_a_timeline_point_keeps_only_the_analysis_of_the_current_phase() -> None:
    analysis = {"phase_index": 1, "values": {"error-rate": {"value": 0.01, "verdict": "pass", "detail": "long"}}}
    point = sample(view("canary", 1), analysis, at=5.0)
    assert point["phase"] == "canary-10" and point["weight"] == 0.1
    assert point["guardrails"]["error-rate"]["verdict"] == "pass" and "detail" not in point["guardrails"]["error-rate"]
    assert sample(view("shadow", 0), analysis, at=1.0)["guardrails"] == {}  # a stale analysis is not shown


def test_the_analysis_behind_each_decision_joins_the_timeline_in_the_phase_it_decided() -> None:
    # Sampled once a second, the timeline never saw the all-pass analysis that ended the shadow phase.
    points = [{**sample(view("shadow", 0), None, 100.0 + i), "guardrails": {}} for i in range(3)]
    points.append({**sample(view("canary", 1), None, 103.2), "guardrails": {}})
    deciding = {"recall": {"value": 0.6, "verdict": "pass", "detail": "long", "samples": 40}}
    decisions = [
        {"at": 100.0, "from_status": "pending", "to_status": "shadow", "metrics": {"phases": 2}},
        {"at": 102.5, "from_status": "shadow", "to_status": "canary", "metrics": {"values": deciding}},
    ]
    merged = with_decisions(points, decisions)
    assert [p["t"] for p in merged] == [100.0, 101.0, 102.0, 102.5, 103.2]
    added = merged[3]
    assert added["decision"] and added["phase"] == "shadow" and added["weight"] == 0.0
    assert added["guardrails"] == {"recall": {"value": 0.6, "verdict": "pass", "limit": None, "baseline": None,
                                              "samples": 40}}  # fmt: skip
    assert with_decisions([], decisions) == []


def record() -> dict:
    timeline = [
        {**sample(view("shadow", 0), None, 100.0 + i), "guardrails": {"error-rate": {"value": 0.0, "verdict": "pass"}}}
        for i in range(5)
    ] + [{**sample(view("rolled_back", 1), None, 106.0), "guardrails": {}}]
    decisions = [
        {"at": 100.0, "from_status": "pending", "to_status": "shadow", "phase_index": 0, "reason": "started"},
        {"at": 105.5, "from_status": "canary", "to_status": "rolled_back", "phase_index": 1, "reason": "p99 <b>"},
    ]
    run = {"label": "first champion", "status": "SUCCEEDED", "model_version": "1", "aliases": ["champion"]}
    run |= {"history": [{"epoch": 1, "train_loss": 0.1, "val_pr_auc": 0.4}, {"epoch": 2, "train_loss": 0.05}]}
    run |= {"steps": {"validate": {"passed": 43, "evaluated": 43}}, "metrics": {"test_pr_auc": 0.5}}
    rollout = {"label": "latency", "outcome": "rolled_back", "reason": "p99 <b>", "decision_seconds": 5.5}
    rollout |= {"rollout_id": "r1", "decisions": decisions, "timeline": timeline, "traffic": {"answered": 10}}
    summary = [{"step": "stack", "what": "up", "outcome": "up", "seconds": 1.0}]
    return {"runs": [run], "rollouts": [rollout], "summary": summary, "duration_s": 9}


def test_the_report_is_one_self_contained_page_with_every_section_and_escaped_text(tmp_path: Path) -> None:
    page = render_report(record(), tmp_path / "report.html").read_text()
    for text in ("Summary", "Training pipeline runs", "Guarded rollouts", "43 of 43 expectations", "first champion"):
        assert text in page
    assert page.count("plotly.js v") == 1  # plotly.js embedded once (works offline), not once per figure
    assert "p99 &lt;b&gt;" in page and "p99 <b>" not in page


def test_the_picture_of_the_rollouts_is_a_png(tmp_path: Path) -> None:
    path = render_png(record(), tmp_path / "rollouts.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert render_png({"rollouts": []}, tmp_path / "none.png") is None
