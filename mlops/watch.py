"""`mlops rollout watch`: a live terminal view of the active rollout (rich), until its decision.

It shows the phase, the challenger's weight, the time in the phase (and the elapsed time of the rollout), the
gate or pause holding it, and for each guardrail of the latest recorded analysis its estimate, interval,
verdict and samples against those it needs. It ends when the rollout is decided: exit code 0 when it was
promoted (or succeeded), 1 when it was rolled back or aborted. `render` is pure; `watch` polls the controller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from control_plane.rollouts_client import ControllerError, ControllerUnavailable, RolloutsClient
from mlops.timeline import weight_of

GOOD = ("promoted_watching", "succeeded")
BAD = ("rolled_back", "aborted")
VERDICT_STYLE = {"pass": "green", "fail": "bold red", "inconclusive": "yellow"}


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.0f}s"


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _interval(values: dict[str, Any]) -> str:
    """The guardrail's confidence interval, whichever way it reports one."""
    interval = values.get("interval")
    if isinstance(interval, list | tuple) and len(interval) == 2:
        return f"[{_number(interval[0])}, {_number(interval[1])}]"
    for low, high in (("lower", "upper"), ("ci_low", "ci_high"), ("interval_low", "interval_high")):
        if values.get(low) is not None or values.get(high) is not None:
            return f"[{_number(values.get(low))}, {_number(values.get(high))}]"
    return "-"


def phase_name(view: dict[str, Any]) -> str:
    phases, index = view["plan"]["phases"], view["state"]["phase_index"]
    return phases[index]["name"] if index < len(phases) else "watch"


def render(view: dict[str, Any], analysis: dict[str, Any] | None, now: float) -> Group:
    """The whole screen for one rollout view and its latest analysis (pure)."""
    state, plan = view["state"], view["plan"]
    status, phase = state["status"], phase_name(view)
    started = state["history"][0]["at"] if state.get("history") else state["phase_started_at"]
    holding = ""
    if state.get("paused"):
        holding = "  [bold yellow]PAUSED[/bold yellow]"
    elif state.get("awaiting_approval_since") is not None:
        waited = _duration(now - state["awaiting_approval_since"])
        holding = f"  [bold yellow]AWAITING APPROVAL[/bold yellow] for {waited}"
    title = Text.from_markup(
        f"[bold]{view['rollout_id']}[/bold]  {plan['model_name']} v{plan['challenger_version']} "
        f"vs champion v{plan['champion_version']}"
    )
    total = len(plan["phases"])
    index = state["phase_index"]
    where = f"{index + 1}/{total}" if index < total else "after promotion"
    line = Text.from_markup(
        f"phase [bold cyan]{phase}[/bold cyan] ({where}, {status})  weight [bold]{weight_of(view):.0%}[/bold]  "
        f"in phase [bold]{_duration(now - state['phase_started_at'])}[/bold]  "
        f"elapsed [bold]{_duration(now - started)}[/bold]  "
        f"failures {state['consecutive_failures']}/{plan['failure_limit']}{holding}"
    )
    table = Table("guardrail", "estimate", "baseline", "interval", "limit", "verdict", "samples", expand=False)
    if analysis is not None and analysis.get("phase_index") == index:
        for name, values in sorted((analysis.get("values") or {}).items()):
            verdict = values.get("verdict", "?")
            samples = f"{_number(values.get('samples'))}/{_number(values.get('min_samples'))}"
            table.add_row(
                name,
                _number(values.get("value")),
                _number(values.get("baseline")),
                _interval(values),
                _number(values.get("limit")),
                Text(str(verdict), style=VERDICT_STYLE.get(str(verdict), "")),
                samples,
            )
        footer = f"analysis #{analysis.get('seq', '?')} {_duration(now - analysis['at'])} ago"
        footer += f", {analysis.get('samples', 0)} samples in the phase"
    else:
        footer = "waiting for the phase's first analysis"
    last = Text(f"last decision: {state.get('reason') or '-'}", style="dim")
    return Group(title, line, table, Text(footer, style="dim"), last)


def outcome_code(status: str) -> int | None:
    """0 once promoted, 1 once rolled back or aborted, None while undecided."""
    if status in GOOD:
        return 0
    if status in BAD:
        return 1
    return None


def watch(
    client: RolloutsClient,
    console: Console,
    interval_s: float = 0.5,
    clock: Callable[[], float] = time.time,
    rollout_id: str | None = None,
    wait_for_start_s: float = 60.0,
) -> int:
    """Follow the active rollout (or `rollout_id`) live until its decision; returns the exit code."""
    deadline = time.monotonic() + wait_for_start_s
    with Live(Text("waiting for an active rollout..."), console=console, refresh_per_second=4) as live:
        while True:
            try:
                view = client.rollout(rollout_id) if rollout_id else client.active()
                if view is None:
                    if time.monotonic() > deadline:
                        live.update(Text("no active rollout"))
                        return 2
                    time.sleep(interval_s)
                    continue
                rollout_id = view["rollout_id"]
                latest = client.analyses(rollout_id, limit=1)
            except (ControllerError, ControllerUnavailable) as error:
                live.update(Text(f"controller unavailable: {error}; retrying", style="yellow"))
                time.sleep(interval_s)
                continue
            live.update(render(view, latest[-1] if latest else None, clock()))
            code = outcome_code(view["state"]["status"])
            if code is not None:
                return code
            time.sleep(interval_s)
