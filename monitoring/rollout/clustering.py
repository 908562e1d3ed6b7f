"""How clustered a traffic window is: the design effect of the guardrails' signals, grouped by account.

Routing is sticky by account and an account's requests share its features, so its labels, decisions and score
differences go together. The guardrails' variances are cluster-robust by account (`guardrails.Moments`): a window
whose requests cluster carries less information than as many independent requests, and a phase takes longer to
decide. The design effect of a signal is the cluster-robust variance of its mean divided by the variance the same
rows would have if they were independent (Kish's deff; 1 for independent requests). The power planner takes it as
`planning.design_effect` (every contrast's variance multiplied by it).

It grows with the window: a mean over n requests of accounts sending m_i of them has deff ~ 1 + rho (sum m_i^2 /
n - 1), rho the correlation of two requests of one account, and sum m_i^2 / n grows with n while the same accounts
keep coming. So measure it over a window as long as the longest phase deadline you plan (`mlops rollout
design-effect --window-s`), not over a few seconds.

Signals measured, on the rows the guardrails judge (no forced QA or degraded answers), where the window has them:
declines (no labels needed), fraud labels (the labelled requests: a proxy for the label-driven guardrails), and,
where the window holds shadow pairs with labels (a past rollout's shadow phase), the paired log-loss difference
and the paired recall difference (champion's minus challenger's decline of each labelled fraud) that the shadow
guardrails judge. The largest is the one to plan with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.prediction_log import (
    ACCOUNT_ID,
    LABEL,
    REQUEST_ID,
    SCORE,
    SHADOW_SCORE,
    without_degraded,
    without_forced,
)
from monitoring.rollout.guardrails import Moments, log_losses


@dataclass(frozen=True)
class DesignEffect:
    signal: str
    rows: int
    accounts: int
    busiest_account_rows: int  # the most rows one account has in the signal's sample
    design_effect: float  # nan with fewer than two rows or no variance


def design_effect(values: np.ndarray, accounts: np.ndarray) -> float:
    """Cluster-robust variance of the mean of `values` (grouped by `accounts`) over the independent-rows one."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2 or float(np.var(x)) == 0.0:
        return math.nan
    robust = float(Moments.of(x, accounts).variance_of_mean())
    plain = float(Moments.of(x).variance_of_mean())
    return robust / plain


def _effect(signal: str, values: np.ndarray, accounts: np.ndarray) -> DesignEffect:
    sizes = pd.Series(accounts).value_counts()
    busiest = int(sizes.iloc[0]) if len(sizes) else 0
    return DesignEffect(signal, len(values), len(sizes), busiest, design_effect(values, accounts))


def measure_design_effects(predictions: pd.DataFrame, feedback: pd.DataFrame, threshold: float) -> list[DesignEffect]:
    """The design effect of each signal the window has (see the module docstring). `predictions`: the prediction
    log's rows (request_id, account_id, score and, in shadow, shadow_score); `feedback`: request_id -> label."""
    predictions = without_degraded(without_forced(predictions))  # the rows the guardrails judge
    answered = predictions[predictions[SCORE].notna()] if SCORE in predictions else predictions.iloc[:0]
    answered = answered.drop_duplicates(REQUEST_ID)
    out: list[DesignEffect] = []
    if answered.empty:
        return out
    accounts = answered[ACCOUNT_ID].astype(str).to_numpy()
    out.append(_effect("declines", (answered[SCORE].to_numpy() >= threshold).astype(float), accounts))
    if feedback is None or feedback.empty:
        return out
    labels = feedback.drop_duplicates(REQUEST_ID).set_index(REQUEST_ID)[LABEL]
    labelled = answered[answered[REQUEST_ID].isin(labels.index)]
    if labelled.empty:
        return out
    y = labelled[REQUEST_ID].map(labels).to_numpy(dtype=float)
    out.append(_effect("fraud labels", y, labelled[ACCOUNT_ID].astype(str).to_numpy()))
    if SHADOW_SCORE in labelled:
        paired = labelled[SHADOW_SCORE].notna().to_numpy()
        if paired.sum() >= 2:
            champion = labelled[SCORE].to_numpy(dtype=float)[paired]
            challenger = labelled[SHADOW_SCORE].to_numpy(dtype=float)[paired]
            difference = log_losses(challenger, y[paired]) - log_losses(champion, y[paired])
            accounts = labelled[ACCOUNT_ID].astype(str).to_numpy()[paired]
            out.append(_effect("paired log-loss difference", difference, accounts))
            fraud = y[paired] == 1
            if fraud.sum() >= 2:
                caught = (champion >= threshold).astype(float) - (challenger >= threshold).astype(float)
                out.append(_effect("paired recall difference", caught[fraud], accounts[fraud]))
    return out


def planning_design_effect(effects: list[DesignEffect]) -> float:
    """The design effect to plan with: the largest measured, and never below 1 (independent requests)."""
    finite = [e.design_effect for e in effects if math.isfinite(e.design_effect)]
    return max([1.0, *finite])
