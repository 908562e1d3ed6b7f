"""The demo's HTML report (one self-contained file) and a PNG of its rollout timelines for the README.

Rendered from one JSON record that the demo writes as it goes (`record.json` beside the report), so the report
is a pure function of data: pipeline runs (steps, validation, drift, training curves, holdout metrics) and
rollouts (traffic weight and guardrail values over time, every decision and why).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

VERDICT_COLOUR = {"pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#9e9e9e"}
OUTCOME_COLOUR = {"promoted": "#2e7d32", "rolled_back": "#c62828", "rolled_back_after_promotion": "#c62828"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #eee;padding-bottom:.3rem;margin-top:2.5rem}
table{border-collapse:collapse;margin:1rem 0;width:100%} td,th{border:1px solid #ddd;padding:.35rem .6rem;
text-align:left;vertical-align:top;font-size:.92rem} th{background:#f6f6f6}
.ok{color:#2e7d32;font-weight:600} .bad{color:#c62828;font-weight:600} .muted{color:#777}
.card{border:1px solid #e3e3e3;border-radius:8px;padding:1rem 1.2rem;margin:1rem 0}
code{background:#f3f3f3;padding:0 .25rem;border-radius:3px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _mark(ok: bool, text: str) -> str:
    return f'<span class="{"ok" if ok else "bad"}">{_e(text)}</span>'


# ---------------------------------------------------------------- figures


def training_figure(history: list[dict[str, float]], title: str) -> go.Figure:
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    epochs = [h.get("epoch") for h in history]
    if any("train_loss" in h for h in history):
        figure.add_trace(go.Scatter(x=epochs, y=[h.get("train_loss") for h in history], name="train loss"))
    if any("val_log_loss" in h for h in history):
        figure.add_trace(go.Scatter(x=epochs, y=[h.get("val_log_loss") for h in history], name="validation log loss"))
    if any("val_pr_auc" in h for h in history):
        figure.add_trace(
            go.Scatter(x=epochs, y=[h.get("val_pr_auc") for h in history], name="validation PR-AUC"), secondary_y=True
        )
    figure.update_layout(title=title, height=320, margin={"t": 50, "b": 40}, legend={"orientation": "h"})
    figure.update_xaxes(title="epoch")
    figure.update_yaxes(title="loss", secondary_y=False)
    figure.update_yaxes(title="PR-AUC", secondary_y=True)
    return figure


def rollout_figure(rollout: dict[str, Any]) -> go.Figure:
    """Challenger traffic weight (and phase) on top; each guardrail's challenger value below, decisions marked."""
    points = rollout.get("timeline", [])
    t0 = points[0]["t"] if points else 0.0
    names = sorted({name for p in points for name in p["guardrails"]})
    figure = make_subplots(
        rows=1 + max(1, len(names)),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.03,
        subplot_titles=["challenger share of live traffic (phase)", *names],
        row_heights=[1.3] + [1.0] * max(1, len(names)),
    )
    xs = [p["t"] - t0 for p in points]
    figure.add_trace(
        go.Scatter(
            x=xs,
            y=[p["weight"] for p in points],
            mode="lines",
            line_shape="hv",
            name="weight",
            text=[f"{p['status']} / {p['phase']}" for p in points],
            hovertemplate="%{text}: %{y:.0%}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    figure.update_yaxes(range=[-0.05, 1.05], tickformat=".0%", row=1, col=1)
    for row, name in enumerate(names, start=2):
        series = [(p["t"] - t0, {**p["guardrails"].get(name, {}), "decision": p.get("decision")}) for p in points]
        series = [(x, g) for x, g in series if g.get("value") is not None]
        figure.add_trace(
            go.Scatter(
                x=[x for x, _ in series],
                y=[g["value"] for _, g in series],
                mode="lines+markers",
                name=name,
                marker={
                    "color": [VERDICT_COLOUR.get(g.get("verdict"), "#555") for _, g in series],
                    "size": [11 if g.get("decision") else 6 for _, g in series],
                    "line": {"color": "black", "width": [1.5 if g.get("decision") else 0 for _, g in series]},
                },
                line={"color": "#607d8b"},
                text=[g.get("verdict") for _, g in series],
                hovertemplate="%{y:.4g} (%{text})<extra>" + name + "</extra>",
            ),
            row=row,
            col=1,
        )
        baseline = [(x, g["baseline"]) for x, g in series if g.get("baseline") is not None]
        if baseline:
            figure.add_trace(
                go.Scatter(
                    x=[x for x, _ in baseline],
                    y=[b for _, b in baseline],
                    mode="lines",
                    name=f"{name} champion",
                    line={"dash": "dot", "color": "#9e9e9e"},
                ),
                row=row,
                col=1,
            )
    for decision in rollout.get("decisions", []):
        if decision["to_status"] != decision["from_status"] and points:
            figure.add_vline(x=decision["at"] - t0, line={"color": "#bbb", "dash": "dash", "width": 1})
    figure.update_layout(
        title=f"{rollout['label']}: {rollout.get('outcome')} ({rollout.get('rollout_id')})",
        height=220 + 150 * max(1, len(names)),
        showlegend=False,
        margin={"t": 70, "b": 40},
    )
    figure.update_xaxes(title="seconds since the rollout started", row=1 + max(1, len(names)), col=1)
    return figure


# ---------------------------------------------------------------- sections


def _link(path: str, text: str) -> str:
    return f'<a href="{html.escape(Path(path).resolve().as_uri())}">{_e(text)}</a>'


def _drifted(drift: dict[str, Any]) -> str:
    return ", ".join(drift.get("drifted_columns", [])) or "none"


def _run_section(run: dict[str, Any]) -> tuple[str, list[go.Figure]]:
    ok = run.get("status") == "SUCCEEDED"
    steps = run.get("steps", {})
    validation = steps.get("validate", {})
    drift = steps.get("drift_check", {})
    rows = [
        ["status", _mark(ok, run.get("status", "?"))],
        ["model version", _e(f"v{run.get('model_version')} {run.get('aliases')}")],
        ["run id / time", _e(f"{run.get('run_id')} / {run.get('seconds')} s")],
        [
            "validation (Great Expectations)",
            _e(
                f"{validation.get('passed', '?')} of {validation.get('evaluated', '?')} expectations passed"
                + (f"; failed: {validation.get('failed')}" if validation.get("failed") else "")
            ),
        ],
        [
            "drift vs champion (Evidently)",
            _e(
                "no champion yet: this data becomes the reference"
                if drift.get("drift_share") is None
                else f"drift share {drift['drift_share']:.2f}; drifted: {_drifted(drift)}"
            ),
        ],
        ["holdout metrics", _e(", ".join(f"{k} {v:.4f}" for k, v in sorted(run.get("metrics", {}).items())))],
        ["step pages", " · ".join(_link(path, name) for name, path in run.get("pages", {}).items()) or "-"],
        ["deploy", _e(f"{(run.get('deploy') or {}).get('action')}: {(run.get('deploy') or {}).get('reason')}")],
    ]
    if not ok:
        rows.append(["failed step", _e(f"{run.get('failed_step')}: {run.get('reason')}")])
    body = f"<div class='card'><h3>{_e(run['label'])}</h3>{_table(['', ''], rows, raw=True)}</div>"
    figures = [training_figure(run["history"], f"{run['label']}: training curves")] if run.get("history") else []
    return body, figures


def _rollout_section(rollout: dict[str, Any]) -> tuple[str, list[go.Figure]]:
    decisions = rollout.get("decisions", [])
    t0 = decisions[0]["at"] if decisions else 0.0
    rows = [
        [
            f"{d['at'] - t0:.1f}s",
            f"{d['from_status']} → {d['to_status']}",
            d["reason"],
            json.dumps({k: v for k, v in d.get("metrics", {}).items() if not isinstance(v, dict)}, default=str)[:300],
        ]
        for d in decisions
    ]
    outcome = rollout.get("outcome", "?")
    colour = OUTCOME_COLOUR.get(outcome, "#555")
    traffic = rollout.get("traffic", {})
    header = (
        f"<div class='card'><h3>{_e(rollout['label'])}: <span style='color:{colour}'>{_e(outcome)}</span></h3>"
        f"<p>{_e(rollout.get('story', ''))}</p>"
        f"<p><b>Decision</b> after {_e(rollout.get('decision_seconds'))} s: {_e(rollout.get('reason'))}</p>"
        f"<p class='muted'>Clients: {_e(traffic.get('answered'))} answered, {_e(traffic.get('failed'))} failed; "
        f"by variant {_e(traffic.get('by_variant'))}, by status {_e(traffic.get('by_status'))}.</p>"
    )
    body = header + _table(["when", "transition", "why", "values behind it"], rows) + "</div>"
    return body, [rollout_figure(rollout)] if rollout.get("timeline") else []


def render_report(record: dict[str, Any], out: Path) -> Path:
    """Write the self-contained HTML report (plotly embedded once) and return its path."""
    parts: list[str] = []
    figures: list[go.Figure] = []
    summary_rows = [[r["step"], r["what"], r["outcome"], r.get("seconds", "")] for r in record.get("summary", [])]

    def add(section: tuple[str, list[go.Figure]]) -> None:
        text, figs = section
        parts.append(text)
        for figure in figs:
            parts.append(f"<!--figure-{len(figures)}-->")
            figures.append(figure)

    for run in record.get("runs", []):
        add(_run_section(run))
    runs_html, parts = parts, []
    for rollout in record.get("rollouts", []):
        add(_rollout_section(rollout))
    rollouts_html = parts
    rendered = [
        figure.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
        for i, figure in enumerate(figures)
    ]

    def fill(chunks: list[str]) -> str:
        text = "\n".join(chunks)
        for i, figure_html in enumerate(rendered):
            text = text.replace(f"<!--figure-{i}-->", figure_html)
        return text

    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>MLOps demo report</title>
<style>{CSS}</style></head><body>
<h1>Card-fraud MLOps demo</h1>
<p class="muted">{_e(record.get("started", ""))} · {_e(record.get("duration_s", "?"))} s on the embedded default ·
MLOPS_HOME {_e(record.get("home", ""))}</p>
<h2>Summary</h2>{_table(["step", "what happened", "outcome", "seconds"], summary_rows)}
<h2>Training pipeline runs</h2>
<p>ingest → validate (Great Expectations) → drift check (Evidently) → train (Ray Train, checkpoints) → evaluate
(offline gate vs the champion) → register (MLflow) → deploy (a guarded rollout through the controller).</p>
{fill(runs_html)}
<h2>Guarded rollouts</h2>
<p>Top: the challenger's share of live traffic (shadow = 0 %). Below: each guardrail's value for the challenger
(dots coloured by verdict: green pass, grey inconclusive, red fail; large ringed dots: the analysis behind a
decision; dotted: the champion). Dashed lines: decisions.</p>
{fill(rollouts_html)}
</body></html>"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def render_png(record: dict[str, Any], out: Path) -> Path | None:
    """A static picture of the rollout timelines (matplotlib), for the README."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rollouts = [r for r in record.get("rollouts", []) if r.get("timeline")]
    if not rollouts:
        return None
    figure, axes = plt.subplots(2, len(rollouts), figsize=(6.5 * len(rollouts), 6), squeeze=False, sharex="col")
    for column, rollout in enumerate(rollouts):
        points = rollout["timeline"]
        t0 = points[0]["t"]
        xs = [p["t"] - t0 for p in points]
        top, bottom = axes[0][column], axes[1][column]
        top.step(xs, [p["weight"] for p in points], where="post", color="#1565c0")
        top.set_ylim(-0.05, 1.05)
        top.set_ylabel("challenger share of live traffic")
        top.set_title(f"{rollout['label']}: {rollout.get('outcome')}", fontsize=11)
        names = sorted({n for p in points for n in p["guardrails"]})
        for row, name in enumerate(names):  # one strip per guardrail, a dot per analysis, coloured by verdict
            series = [
                (x, p["guardrails"][name].get("verdict"))
                for x, p in zip(xs, points, strict=True)
                if name in p["guardrails"]
            ]
            bottom.scatter(
                [x for x, _ in series], [row] * len(series), c=[VERDICT_COLOUR.get(v, "#555") for _, v in series], s=9
            )
            deciding = [(x, p["guardrails"][name].get("verdict")) for x, p in zip(xs, points, strict=True)
                        if p.get("decision") and name in p["guardrails"]]  # fmt: skip
            bottom.scatter(
                [x for x, _ in deciding],
                [row] * len(deciding),
                c=[VERDICT_COLOUR.get(v, "#555") for _, v in deciding],
                s=40,
                edgecolors="black",
                linewidths=0.8,
            )
        bottom.set_yticks(range(len(names)), names, fontsize=8)
        bottom.set_ylim(-0.7, len(names) - 0.3)
        bottom.set_title(
            "verdicts: green pass, grey inconclusive, red fail; ringed: behind a decision",
            fontsize=9,
        )
        bottom.set_xlabel("seconds since the rollout started")
        for decision in rollout.get("decisions", []):
            if decision["to_status"] != decision["from_status"]:
                for axis in (top, bottom):
                    axis.axvline(decision["at"] - t0, color="#bbb", linestyle=":", linewidth=0.8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out
