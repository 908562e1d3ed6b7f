"""Guardrails on account-clustered traffic: whole simulated rollouts, request by request, through the live guardrail
entry point (`evaluate_guardrails`), `to_analysis` and the real state machine (`step`).

`benchmarks/guardrails.py` simulates per-second counts of request types, so its requests are independent given
the second. Routing is sticky by account and an account's requests share its features (home country, age,
typical spend: `core.synthetic`), so its labels and score differences are correlated; the guardrails' variances
are cluster-robust by account for that reason. This benchmark checks that claim on traffic that has accounts.

What is simulated, per rollout:

- The pool: 200,000 transactions of `core.synthetic` (seed 3, 8,000 accounts of Pareto-like activity), scored by
  the two logistic models of `benchmarks/guardrails.py` (champion: trained on seed 1; the `identical`
  challenger, a healthy retrain: seed 2); the cases' challenger scores come from its `make_case`.
- Requests arrive as a Poisson process at the spec's planned rate (200/s); each is a random row of the pool, so a
  heavy account recurs with its correlated features and label. Each is labelled `label_delay_s` later.
- The default spec's replay phase finds no logged history in a simulation and goes on (`on_inconclusive`), as on
  a model's first rollout. Shadow: every request scored by both models; shadow errors come in failed batch calls
  of 64 requests at the case's error rate; the champion errs per request at 0.1 %. Canary at weight w: the arm
  of a request is `serving.routing.route(account_id, "a", w, shadow=False)`, sticky by account; a challenger
  error is answered by the champion (`status == "fallback"`, as the gateway logs it). Watch: the promoted model
  alone. Latency log-normal (median 20 ms, sigma 0.35; x2 for `p99_x2`).
- Every `--interval` seconds from the phase start, the phase's window (the rows served since it began) and the
  labels received so far go to `evaluate_guardrails`, then `to_analysis` and `step`; a `Tick` at each phase
  deadline and at the end of the watch. A rollout ends rolled back or succeeded.
- `--no-accounts`: the ablation: every request logged as its own account (routing and variances per request),
  on the same clustered traffic.
- Reported with each row: how clustered the traffic is, measured on the last shadow window of each rollout with
  the pool's real accounts: the design effect (cluster-robust variance of the mean / the independent-rows one)
  of the fraud labels and of the paired log-loss difference, and the most requests one account sent.

Not simulated: per-transaction features other than those the guardrails read (merchant category, country,
device, amount), degraded answers, and the replay phase's judgement of logged history.

    .venv/bin/python benchmarks/guardrails_accounts.py [--rollouts 200] [--interval 5] [--cases a,b]
        [--specs default,fast] [--rollouts-for CASE[/SPEC]=N ...] [--no-accounts] [--seed 0]

The last stdout line is one JSON object: {"benchmark": "guardrails_accounts", "rollouts": N, "interval_s": I,
"cases": {CASE: {SPEC: {"rollouts", "rolled_back", "rate", "ci95", "median_decision_s", ...}}}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.guardrails import (  # noqa: E402
    BASE_ERROR,
    LATENCY_MEDIAN_MS,
    LATENCY_SIGMA,
    SHADOW_BATCH,
    THRESHOLD,
    Case,
    Pool,
    _planning,
    make_case,
    pool_of,
)
from core.schema import CATEGORICAL_FEATURES  # noqa: E402
from core.synthetic import generate_transactions  # noqa: E402
from monitoring.rollout.analysis import phase_samples, to_analysis  # noqa: E402
from monitoring.rollout.clustering import design_effect  # noqa: E402
from monitoring.rollout.driver import plan_for  # noqa: E402
from monitoring.rollout.guardrails import clopper_pearson, evaluate_guardrails, log_losses  # noqa: E402
from monitoring.rollout.slice_guardrails import SLICE_GUARDRAILS  # noqa: E402
from monitoring.rollout.spec import RolloutSpec, default_spec, fast_spec  # noqa: E402
from monitoring.rollout.state_machine import Analysis, AnalysisResult, Start, Tick, initial_state, step  # noqa: E402
from serving.routing import route  # noqa: E402

CASES = ("identical", "recall_drop_20", "inside_margin")
SPECS = {"default": default_spec, "fast": fast_spec}
CHAMPION_SLOT, CHALLENGER_SLOT = "a", "b"
BLOCK_S = 60.0  # requests are drawn a minute at a time, as far as the rollout gets


@dataclass(frozen=True)
class Traffic:
    """The pool as requests: the logged columns of each row, its account, label and both models' scores."""

    pool: Pool
    account: np.ndarray  # str, the pool's account ids
    logged: dict[str, np.ndarray]  # the request columns the guardrails read (slices, fraud amount)


def build_traffic(rows: int = 200_000, rows_per_account: float = 25.0) -> Traffic:
    frame = generate_transactions(rows, seed=3, rows_per_account=rows_per_account)
    logged = {name: frame[name].astype(str).to_numpy() for name in CATEGORICAL_FEATURES}
    logged["amount"] = frame["amount"].to_numpy(dtype=float)
    return Traffic(pool_of(frame), frame["account_id"].astype(str).to_numpy(), logged)


# ---------------------------------------------------------------- one phase's requests, drawn as far as needed


class Stream:
    """The requests of one phase (times from the phase start), drawn a block at a time, with their log rows
    (`frame`) and labels (`feedback`, in the same order: every label comes `delay` after its request)."""

    def __init__(self, kind: str, weight: float, traffic: Traffic, case: Case, rng: np.random.Generator, rps: float,
                 delay: float, start: float, accounts: bool, tag: str, logged: bool = True) -> None:  # fmt: skip
        self.kind, self.weight, self.traffic, self.case, self.rng = kind, weight, traffic, case, rng
        self.rps, self.delay, self.start, self.accounts, self.tag = rps, delay, start, accounts, tag
        self.logged = logged  # carry the request columns the slice guardrails read (only where one applies)
        self.drawn_to = 0.0
        self.parts: list[pd.DataFrame] = []
        self.frame = pd.DataFrame()
        self.ts = np.zeros(0)
        self.rows = np.zeros(0, dtype=int)  # pool row of each request
        self.batch_fails = np.zeros(0, dtype=bool)  # shadow: one draw per batch call of SHADOW_BATCH requests
        self.routes: dict[str, str] = {}

    def _variant(self, account: str) -> str:
        known = self.routes.get(account)
        if known is None:
            known = route(account, CHAMPION_SLOT, self.weight, shadow=False).variant
            if self.accounts:  # per-request ids never recur: no point keeping them
                self.routes[account] = known
        return known

    def _latency(self, n: int, factor: float) -> np.ndarray:
        return LATENCY_MEDIAN_MS * factor * np.exp(LATENCY_SIGMA * self.rng.standard_normal(n))

    def _block(self, until: float) -> pd.DataFrame:
        rng, pool, case = self.rng, self.traffic.pool, self.case
        n = int(rng.poisson(self.rps * (until - self.drawn_to)))
        ts = np.sort(rng.uniform(self.drawn_to, until, n))
        rows = rng.integers(0, len(pool.label), n)
        first = len(self.ts)
        ids = np.array([f"{self.tag}-{first + i}" for i in range(n)], dtype=object)
        account = self.traffic.account[rows] if self.accounts else ids
        b, c = pool.champion[rows], case.challenger[rows]
        nan = np.full(n, np.nan)
        none = np.full(n, None, dtype=object)
        col: dict[str, Any] = {"request_id": ids, "ts": self.start + ts, "account_id": account}
        if self.kind == "shadow":
            failed = rng.random(n) < BASE_ERROR
            index = first + np.arange(n)
            batches = int(index[-1] // SHADOW_BATCH + 1) if n else 0
            if batches > len(self.batch_fails):
                more = rng.random(batches - len(self.batch_fails)) < case.error
                self.batch_fails = np.concatenate([self.batch_fails, more])
            shadow_failed = self.batch_fails[index // SHADOW_BATCH] if n else np.zeros(0, dtype=bool)
            col |= {"variant": np.full(n, "champion", dtype=object), "slot": CHAMPION_SLOT, "model_version": "1",
                    "score": np.where(failed, nan, b), "latency_ms": self._latency(n, 1.0),
                    "status": np.where(failed, "error", "ok").astype(object),
                    # a champion that failed had nothing to shadow
                    "shadow_slot": np.where(failed, none, CHALLENGER_SLOT),
                    "shadow_model_version": np.where(failed, none, "2"),
                    "shadow_score": np.where(failed | shadow_failed, nan, c),
                    "shadow_latency_ms": np.where(failed, nan, self._latency(n, case.latency_factor)),
                    "shadow_status": np.where(failed, none, np.where(shadow_failed, "error", "ok"))}  # fmt: skip
        elif self.kind == "canary":
            to_challenger = np.array([self._variant(a) == "challenger" for a in account], dtype=bool)
            rate = np.where(to_challenger, case.error, BASE_ERROR)
            failed = rng.random(n) < rate
            lat_b, lat_c = self._latency(n, 1.0), self._latency(n, case.latency_factor)
            fallback = to_challenger & failed  # the champion answers for a failed challenger (the gateway's fallback)
            champion_error = ~to_challenger & failed
            status = np.where(fallback, "fallback", np.where(champion_error, "error", "ok")).astype(object)
            col |= {"variant": np.where(to_challenger & ~failed, "challenger", "champion").astype(object),
                    "slot": np.where(to_challenger & ~failed, CHALLENGER_SLOT, CHAMPION_SLOT).astype(object),
                    "model_version": np.where(to_challenger & ~failed, "2", "1").astype(object),
                    "score": np.where(champion_error, nan, np.where(to_challenger & ~failed, c, b)),
                    "latency_ms": np.where(fallback, lat_c + lat_b, np.where(to_challenger, lat_c, lat_b)),
                    "status": status}  # fmt: skip
        else:  # watch: the promoted challenger answers everything, as the champion
            failed = rng.random(n) < case.error
            col |= {"variant": np.full(n, "champion", dtype=object), "slot": CHALLENGER_SLOT, "model_version": "2",
                    "score": np.where(failed, nan, c), "latency_ms": self._latency(n, case.latency_factor),
                    "status": np.where(failed, "error", "ok").astype(object)}  # fmt: skip
        if self.logged:
            col |= {name: values[rows] for name, values in self.traffic.logged.items()}
        col |= {"label": pool.label[rows].astype("int64"), "received_at": self.start + ts + self.delay}
        self.ts = np.concatenate([self.ts, ts])
        self.rows = np.concatenate([self.rows, rows])
        self.drawn_to = until
        return pd.DataFrame(col)

    def upto(self, t: float) -> int:
        """Draw the requests up to `t` seconds into the phase; the number of rows served before `t`."""
        if t > self.drawn_to:
            while self.drawn_to < t:
                self.parts.append(self._block(self.drawn_to + BLOCK_S))
            self.frame = pd.concat(self.parts, ignore_index=True) if len(self.parts) > 1 else self.parts[0]
            self.parts = [self.frame]
        return int(np.searchsorted(self.ts, t, side="left"))


# ---------------------------------------------------------------- how clustered the traffic is


@dataclass
class Clustering:
    label_deff: float = float("nan")  # design effect of the fraud labels by account
    ll_deff: float = float("nan")  # ... of the paired log-loss difference (challenger - champion)
    top_account: int = 0  # requests the busiest account sent in the window
    requests: int = 0


def clustering(traffic: Traffic, case: Case, rows: np.ndarray) -> Clustering:
    """On a window's pool rows, with the pool's real accounts (whatever ids the guardrails saw)."""
    if len(rows) < 2:
        return Clustering()
    account = traffic.account[rows]
    y = traffic.pool.label[rows].astype(float)
    d = log_losses(case.challenger[rows], y) - log_losses(traffic.pool.champion[rows], y)

    _, sizes = np.unique(account, return_counts=True)
    return Clustering(design_effect(y, account), design_effect(d, account), int(sizes.max()), len(rows))


# ---------------------------------------------------------------- whole rollouts


@dataclass
class Outcome:
    status: str = ""
    rolled_back: bool = False
    by_deadline: bool = False
    decision_s: float = float("nan")
    phase: str = ""  # where it was decided: a phase name, "watch", or "promoted"
    looks: int = 0
    traffic: Clustering = field(default_factory=Clustering)
    undecided: tuple[str, ...] = ()  # a deadline rollback: the guardrails that had not passed, or its other reason


def _uses_labels(spec: RolloutSpec, kind: str) -> bool:
    """Whether a guardrail of the phase kind reads labels (where none does, the analysis gets no feedback: the
    verdicts are the same, and each look costs less)."""
    return _uses_slices(spec, kind) or any(kind in cfg.applies_to and type(cfg).USES_LABELS for cfg in spec.guardrails)


def _uses_slices(spec: RolloutSpec, kind: str) -> bool:
    """Whether a guardrail of the phase kind reads logged request columns (slices, fraud amount). Where none does,
    the window carries the served columns only: the verdicts are the same, and each look copies less."""
    return any(kind in cfg.applies_to and cfg.kind in SLICE_GUARDRAILS for cfg in spec.guardrails)


def _judge(spec: RolloutSpec, plan: Any, state: Any, stream: Stream, kind: str, t: float, index: int,
           weight: float | None, labels: bool) -> Any:  # fmt: skip
    """One analysis of the phase window at `t` seconds into the phase, fed to step()."""
    served = stream.upto(t)
    predictions = stream.frame.iloc[:served]
    feedback = None
    if labels:  # labels received by now: the requests served `delay` ago
        arrived = int(np.searchsorted(stream.ts, t - stream.delay, side="right"))
        feedback = stream.frame.iloc[:arrived][["request_id", "label", "received_at"]]
    at = stream.start + t
    if predictions.empty:
        result = AnalysisResult(at=at, phase_index=index, samples=0, verdicts={})
    else:
        results = evaluate_guardrails(spec, kind, predictions, feedback, threshold=THRESHOLD, weight=weight)
        result = to_analysis(results, index, at, samples=phase_samples(kind, predictions))
    return step(plan, state, Analysis(result))[0]


def rollout(spec: RolloutSpec, plan: Any, traffic: Traffic, case: Case, interval: float, rng: np.random.Generator,
            accounts: bool) -> Outcome:  # fmt: skip
    planning = _planning(spec)
    state = step(plan, initial_state(plan, 0.0), Start(at=0.0))[0]
    out = Outcome()
    for index, phase in enumerate(spec.phases):
        if state.terminal or state.phase_index != index:
            break
        if phase.kind == "replay":
            # A replay judges logged history, which a simulated rollout has none of: it finds no labelled request
            # and goes on (on_inconclusive), as on a model's first rollout.
            empty = AnalysisResult(at=state.phase_started_at, phase_index=index, samples=0, verdicts={})
            state = step(plan, state, Analysis(empty))[0]
            continue
        weight = float(phase.weight or 0.0) if phase.kind == "canary" else None
        stream = Stream(phase.kind, weight or 0.0, traffic, case, rng, planning.rps, planning.label_delay_s,
                        state.phase_started_at, accounts, f"{index}", _uses_slices(spec, phase.kind))  # fmt: skip
        deadline = float(phase.max_duration_s or 3600.0)
        labels = _uses_labels(spec, phase.kind)
        t = interval
        while t <= deadline and not state.terminal and state.phase_index == index:
            state = _judge(spec, plan, state, stream, phase.kind, t, index, weight, labels)
            out.looks += 1
            t += interval
        if not state.terminal and state.phase_index == index and state.status != "promoted_watching":
            state = step(plan, state, Tick(at=stream.start + deadline))[0]
        if phase.kind == "shadow":
            served = int(np.searchsorted(stream.ts, min(t - interval, stream.drawn_to), side="left"))
            out.traffic = clustering(traffic, case, stream.rows[:served])
    if state.status == "promoted_watching":
        watch = float(spec.post_promotion_watch_s)
        stream = Stream("watch", 1.0, traffic, case, rng, planning.rps, planning.label_delay_s,
                        state.phase_started_at, accounts, "watch", _uses_slices(spec, "watch"))  # fmt: skip
        labels = _uses_labels(spec, "watch")
        t = interval
        while t <= watch and state.status == "promoted_watching":
            state = _judge(spec, plan, state, stream, "watch", t, state.phase_index, None, labels)
            out.looks += 1
            t += interval
        if state.status == "promoted_watching":
            state = step(plan, state, Tick(at=stream.start + watch))[0]
    out.status = state.status
    out.rolled_back = state.status == "rolled_back"
    decision = next((d for d in reversed(state.history) if d.to_status in ("rolled_back", "promoted_watching")), None)
    if decision is not None:
        out.decision_s = decision.at
        out.by_deadline = out.rolled_back and "undecided" in decision.reason
        if out.by_deadline:  # "phase shadow undecided after 1800s (deadline 1800s): inconclusive: a, b"
            why = decision.reason.split("s): ", 1)[-1]
            # the guardrails still undecided, or the deadline's other reason ("no analysis", "all pass but only ...")
            out.undecided = (
                tuple(why.removeprefix("inconclusive: ").split(", ")) if why.startswith("inconclusive: ") else (why,)
            )
        if out.rolled_back:
            out.phase = plan.phases[decision.phase_index].name if decision.phase_index < len(plan.phases) else "watch"
        else:
            out.phase = "promoted"
    return out


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    n = len(outcomes)
    k = sum(o.rolled_back for o in outcomes)
    lo, hi = clopper_pearson(k, n, 0.975)
    times = [o.decision_s for o in outcomes if np.isfinite(o.decision_s)]
    phases: dict[str, int] = {}
    for o in outcomes:
        phases[o.phase or "undecided"] = phases.get(o.phase or "undecided", 0) + 1
    measured = [o.traffic for o in outcomes if o.traffic.requests]
    undecided: dict[str, int] = {}
    for o in outcomes:
        for name in o.undecided:
            undecided[name] = undecided.get(name, 0) + 1
    median = lambda values: round(float(np.median(values)), 3) if values else None  # noqa: E731
    return {
        "rollouts": n,
        "rolled_back": k,
        "by_guardrail": sum(o.rolled_back and not o.by_deadline for o in outcomes),
        "by_deadline": sum(o.by_deadline for o in outcomes),
        "promoted": sum(o.status == "succeeded" for o in outcomes),
        "rate": round(k / n, 4) if n else None,
        "ci95": [round(lo, 4), round(hi, 4)],
        "median_decision_s": median(times),
        "decided_in": phases,
        "undecided_at_deadline": undecided,  # per guardrail: the deadline rollbacks it had not passed
        "shadow_window": {
            "requests": median([m.requests for m in measured]),
            "label_design_effect": median([m.label_deff for m in measured]),
            "log_loss_diff_design_effect": median([m.ll_deff for m in measured]),
            "busiest_account_requests": median([m.top_account for m in measured]),
        },
    }


def run_config(spec: RolloutSpec, traffic: Traffic, case: Case, interval: float, rollouts: int, seed: int,
               accounts: bool, advance: Any = None) -> list[Outcome]:  # fmt: skip
    rng = np.random.default_rng(seed)
    plan = plan_for(spec, model_name="bench", challenger_version="2", champion_version="1",
                    champion_slot=CHAMPION_SLOT, previous_version=None, rollout_id="bench")  # fmt: skip
    outcomes = []
    for _ in range(rollouts):
        outcomes.append(rollout(spec, plan, traffic, case, interval, rng, accounts))
        if advance is not None:
            advance()
    return outcomes


def with_deadlines(spec: RolloutSpec, deadlines: list[str]) -> RolloutSpec:
    """The spec with other phase deadlines (`--deadline shadow=3600`), validated as a user's spec would be."""
    from monitoring.rollout.spec import load_spec

    if not deadlines:
        return spec
    try:
        wanted = {name: float(seconds) for name, seconds in (item.split("=") for item in deadlines)}
    except ValueError:
        raise SystemExit(f"--deadline takes PHASE=SECONDS, e.g. shadow=3600; got {deadlines}") from None
    data = spec.model_dump(exclude_none=True)
    unknown = set(wanted) - {phase["name"] for phase in data["phases"]}
    if unknown:
        raise SystemExit(f"--deadline: no phase {', '.join(sorted(unknown))} in spec {spec.name}")
    data["phases"] = [{**phase, "max_duration_s": wanted.get(phase["name"], phase.get("max_duration_s"))}
                      for phase in data["phases"]]  # fmt: skip
    return load_spec(data)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=200, help="rollouts per (case, spec)")
    parser.add_argument("--rollouts-for", action="append", default=[], metavar="CASE[/SPEC]=N",
                        help="another count for a case, or a case under one spec: inside_margin/default=8")  # fmt: skip
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between analyses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of the cases")
    parser.add_argument("--specs", default="default,fast")
    parser.add_argument("--pool-rows", type=int, default=200_000)
    parser.add_argument("--rows-per-account", type=float, default=25.0,
                        help="the pool's transactions per account (core.synthetic's default: 25)")  # fmt: skip
    parser.add_argument("--no-accounts", action="store_true", help="ablation: every request its own account id")
    parser.add_argument("--deadline", action="append", default=[], metavar="PHASE=S",
                        help="another max_duration_s for a phase of every spec run: shadow=3600")  # fmt: skip
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    started = time.time()
    traffic = build_traffic(args.pool_rows, args.rows_per_account)
    accounts = not args.no_accounts
    cases, specs = args.cases.split(","), [with_deadlines(SPECS[s](), args.deadline) for s in args.specs.split(",")]
    count = {(name, spec.name): args.rollouts for name in cases for spec in specs}
    for item in args.rollouts_for:
        where, n = item.split("=")
        for key in count:
            if where in (key[0], f"{key[0]}/{key[1]}"):
                count[key] = int(n)
    report: dict[str, Any] = {}
    lines = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:  # fmt: skip
        task = progress.add_task("rollouts", total=sum(count.values()))
        for c_index, name in enumerate(cases):
            report[name] = {}
            for spec in specs:
                progress.update(task, description=f"{name} / {spec.name}")
                case = make_case(name, spec, traffic.pool, np.random.default_rng(args.seed + 17 * c_index))
                seed = args.seed + 1000 * c_index + (spec.name == "fast")
                t0 = time.time()
                outcomes = run_config(spec, traffic, case, args.interval, count[name, spec.name], seed, accounts,
                                      lambda: progress.advance(task))  # fmt: skip
                summary = summarise(outcomes)
                summary["seconds"] = round(time.time() - t0, 1)
                report[name][spec.name] = summary
                lines.append(
                    f"{name:15s} {spec.name:8s} rolled back {summary['rolled_back']}/{summary['rollouts']} "
                    f"({summary['by_guardrail']} by a guardrail, {summary['by_deadline']} by a deadline) "
                    f"ci95 {summary['ci95']} promoted {summary['promoted']} median decision "
                    f"{summary['median_decision_s']} s, decided in {summary['decided_in']}; shadow window "
                    f"{summary['shadow_window']} ({summary['seconds']} s)"
                )
                progress.console.print(lines[-1])
    for line in lines:
        print(line, flush=True)
    print(f"total {time.time() - started:.0f} s", flush=True)
    result = {"benchmark": "guardrails_accounts", "rollouts": args.rollouts, "interval_s": args.interval,
              "accounts": accounts, "pool_rows": args.pool_rows, "rows_per_account": args.rows_per_account,
              "deadlines": args.deadline,
              "cases": report}  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
