"""Slice guardrails (fairness) and the business guardrail, on the confidence sequences of `guardrails`.

Slice guardrails judge a challenger per slice: per value of each configured column (`merchant_category`,
`country`: categorical columns of the data schema, which the gateway logs with every request), so a regression
confined to one merchant category or one country is caught even when the whole-traffic guardrails cannot see
it, and the decision names the slice (`GuardrailResult.slice`, which the state machine quotes).

- `slice_recall`: recall at the decision threshold among the slice's labelled frauds, D = (1 - max_drop)
  recall_champion - recall_challenger; paired over frauds scored by both in shadow (McNemar-style: only the
  discordant frauds move it), two arms clustered by account in a canary (as `guardrails.online_recall`).
- `slice_decline_rate`: the slice's decline rate within [1 - max_change, 1 + max_change] x the champion's, give or
  take `guardrails.MASS_SLACK`; two contrasts at half the slice's budget each; paired in shadow, two arms in a
  canary (as `guardrails.decline_rate`). No labels needed.
- `slice_agreement` (shadow): of the slice's requests either model declines, the share both decline must be at
  least `min_decline_overlap`, D = min - overlap (as `guardrails.shadow_agreement`).

Each slice has its own minimum: a slice below `min_samples` is not judged. The guardrail **fails** when any
judged slice's sequence lies wholly beyond the margin, is **inconclusive** while no slice has its minimum, and
**passes** otherwise: once judged, a slice guardrail can only fail, it never holds a phase until 22 slices'
sequences are all tight (small slices never would be within a phase, and a healthy retrain would be rolled back
at every deadline). Its job is to catch a regression confined to a slice, which the whole-traffic guardrails
cannot; their passes, not the slices', carry the evidence that the challenger is good on average. So a slice
regression is caught if its slice's sequence clears the margin before the phase ends: a question of power,
which `benchmarks/guardrails.py` measures side by side (`slice_recall_halved`: the category with 10 % of the
payments but 1 % of the frauds; `slice_recall_halved_frauds`: the category with about 10 % of the frauds), and
`benchmarks/slice_power.py` sizes (labelled frauds and requests/s a slice needs).

Multiplicity, stated: the guardrail's fail share of the spec's budget (`error_budget`, which counts slice
guardrails like any other) is split by Bonferroni over **every slice its columns can have**: the schema's
categories (10 merchant categories + 12 countries = 22 for the defaults), fixed before any data. Bonferroni over
only the slices judged at a look would not be valid under continuous monitoring, because that set grows with the
data; over the fixed set, each slice's confidence sequence holds at all looks simultaneously with probability
1 - alpha / S, so all of them hold at once with probability >= 1 - alpha (union bound; no independence between
slices needed). The price is a boundary about sqrt(log S) wider than one slice's alone.

Business guardrail, `fraud_amount_caught`: the fraud amount in EUR the challenger catches (the `amount` of
labelled frauds it declines) may drop by at most `max_drop` relative to the champion's; the fraud analogue of
"roll back if online CTR drops by more than 5 % relative". D = (1 - max_drop) A_champion - A_challenger per
labelled fraud, in shadow paired per fraud (both models judge the same frauds, so the two totals are over the
same set), in a canary two arms clustered by account. D is divided by the window's mean fraud amount before the
CS, so the boundary's mixture precision is tuned in relative terms (as `online_recall`'s); the sign, and so the
verdict, does not depend on that divisor, and as the mean converges the boundary is the fixed-precision one.

Construction and assumptions are those of `guardrails` (Waudby-Smith et al. 2024 asymptotic CS, cluster-robust
variance by account); in addition: (1) slices are fixed request attributes, not outcomes of the models; (2) the
amount-weighted contrast needs a finite variance of the amount among frauds (the synthetic amounts are
log-normal; a heavy tail makes the asymptotics slower, not invalid); (3) a slice's first judged look is at its
own `min_samples`, the point from which its asymptotic guarantee is claimed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from core.prediction_log import AMOUNT
from core.schema import COLUMNS_BY_NAME
from monitoring.rollout.guardrails import (
    CS_NAME,
    FAIL,
    INCONCLUSIVE,
    PASS,
    PROPORTION_PSEUDO,
    GuardrailResult,
    Judgement,
    Levels,
    Moments,
    Observations,
    combine_codes,
    difference,
    judge,
    mass_change_judgement,
    paired,
)
from monitoring.rollout.spec import (
    FraudAmountCaughtGuardrail,
    SliceAgreementGuardrail,
    SliceDeclineRateGuardrail,
    SliceRecallGuardrail,
)
from monitoring.rollout.verdicts import Verdict

_VERDICT: dict[int, Verdict] = {FAIL: "fail", INCONCLUSIVE: "inconclusive", PASS: "pass"}


def slice_keys(columns: list[str]) -> list[tuple[str, str]]:
    """Every (column, category) slice the columns can have, from the data schema: the Bonferroni family."""
    return [(column, category) for column in columns for category in COLUMNS_BY_NAME[column].categories]


def slice_keys_named(columns: list[str]) -> list[tuple[str, tuple[str, str]]]:
    """("column=category", (column, category)) for every slice, in `slice_keys` order."""
    return [(f"{column}={category}", (column, category)) for column, category in slice_keys(columns)]


def slice_alpha(alpha: Levels, columns: list[str]) -> Levels:
    """One slice's levels: the guardrail's fail share split over every slice its columns can have (Bonferroni);
    the pass level is not split (a regressed slice must itself pass for the guardrail to pass)."""
    return alpha.split(max(len(slice_keys(columns)), 1))


@dataclass(frozen=True)
class SliceJudged:
    """One slice at one look: what it counted, and (when it reached min_samples) its judgement of D."""

    key: str  # "merchant_category=electronics"
    samples: int
    judged: Judgement | None
    value: float | None
    baseline: float | None
    text: str

    @property
    def code(self) -> int:
        return INCONCLUSIVE if self.judged is None else int(np.asarray(self.judged.code))

    @property
    def lower(self) -> float:
        return -np.inf if self.judged is None else float(np.asarray(self.judged.lower))


def _codes(account: np.ndarray) -> np.ndarray:
    """Integer cluster codes of the accounts (hashing, no sort), computed once per look: every slice reuses them."""
    return pd.factorize(pd.Series(np.asarray(account), dtype=object))[0] if len(account) else np.zeros(0, dtype=int)


def _moments(values: np.ndarray, codes: np.ndarray, pseudo: float = 0.0) -> Moments:
    """`Moments.of(values, clusters)` for clusters given as integer codes (the same sufficient statistics)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return Moments(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, pseudo)
    sums, sizes = np.bincount(codes, weights=x), np.bincount(codes).astype(float)
    return Moments(float(len(x)), float(x.sum()), float((x * x).sum()), float((sums * sums).sum()),
                   float((sums * sizes).sum()), float((sizes * sizes).sum()), pseudo)  # fmt: skip


def _slices(columns: dict[str, np.ndarray], names: list[str], size: int) -> list[tuple[str, np.ndarray]]:
    """("column=category", mask over the rows) for every slice the columns can have; a column the rows do not
    carry (a log written before it was logged) puts no row in any of its slices."""
    out: list[tuple[str, np.ndarray]] = []
    for column in names:
        categories = COLUMNS_BY_NAME[column].categories
        values = columns.get(column)
        codes = (
            np.full(size, -1)
            if values is None
            else pd.Categorical(np.asarray(values, dtype=object), categories=categories).codes
        )
        out += [(f"{column}={category}", codes == index) for index, category in enumerate(categories)]
    return out


def _combine(
    cfg: Any, alpha_slice: Levels, test: str, limit: float, slices: list[SliceJudged], total: int
) -> GuardrailResult:
    """fail if any judged slice fails; pass once at least one slice is judged and none fails; inconclusive while
    no slice has its min_samples. The result names the failing slice with the largest lower bound (else the
    judged slice nearest to failing, else the largest)."""
    judged = [s for s in slices if s.judged is not None]
    codes = [s.code for s in judged]
    code = INCONCLUSIVE if not judged else FAIL if FAIL in codes else PASS
    failing = sorted((s for s in judged if s.code == FAIL), key=lambda s: -s.lower)
    if failing:
        named = failing[0]
    elif judged:
        named = max(judged, key=lambda s: (s.code != PASS, s.lower))
    else:
        named = max(slices, key=lambda s: s.samples) if slices else None
    parts = [f"{len(judged)} of {total} slices judged (>= {cfg.min_samples} samples each)"]
    if failing:
        parts.append("failing: " + "; ".join(s.text for s in failing[:3]) + (" ..." if len(failing) > 3 else ""))
    elif named is not None:
        parts.append(("worst: " if judged else "largest: ") + named.text)
    verdict = _VERDICT[code]
    return GuardrailResult(
        name=cfg.name,
        verdict=verdict,
        value=named.value if named else None,
        baseline=named.baseline if named else None,
        limit=float(limit),
        samples=named.samples if named else 0,
        min_samples=cfg.min_samples,
        test=f"{test}; per slice of {', '.join(cfg.slices)}, Bonferroni over {total} slices; {CS_NAME}, "
        f"fails at level {alpha_slice.fail:.3g} per slice, passes at {alpha_slice.pass_:.3g}",
        confidence=1 - alpha_slice.fail * total,
        p_value=None,
        detail=f"{'; '.join(parts)}: {verdict}",
        lower=None if named is None or named.judged is None else float(np.asarray(named.judged.lower)),
        upper=None if named is None or named.judged is None else float(np.asarray(named.judged.upper)),
        slice=named.key if named else None,
    )


def _cs(judged: Judgement) -> str:
    return f"CS of D [{float(np.asarray(judged.lower)):+.4g}, {float(np.asarray(judged.upper)):+.4g}]"


def _no_pairs(cfg: Any, alpha: Levels, test: str, limit: float) -> GuardrailResult:
    total = len(slice_keys(cfg.slices))
    return _combine(cfg, slice_alpha(alpha, cfg.slices), test, limit, [], total)


# ---------------------------------------------------------------- slice recall


def slice_recall_scale(cfg: SliceRecallGuardrail, key: str | None = None) -> float:
    """The effect (in units of D) a slice's recall boundaries are tuned for: 60 % of the slice's margin, at least
    0.01 (the slice's own recall is unknown before any data; `monitoring.rollout.slice_plan` plans with the same)."""
    return max(0.6 * (cfg.max_drop if key is None else cfg.drop_for(key)), 0.01)


def slice_recall(cfg: SliceRecallGuardrail, obs: Observations, alpha: Levels) -> GuardrailResult:
    """Per slice, recall among its labelled frauds: D = (1 - max_drop) recall_champion - recall_challenger.
    value/baseline: the named slice's recalls; limit: max_drop."""
    own = f" ({len(cfg.max_drop_by_slice)} slices with their own margin)" if cfg.max_drop_by_slice else ""
    test = f"per-slice recall >= {1 - cfg.max_drop:g} x the champion's{own}"
    a = slice_alpha(alpha, cfg.slices)
    slices: list[SliceJudged] = []
    if obs.pairs is not None:
        fraud = obs.pairs.label == 1
        hit = (obs.pairs.scores[fraud] >= obs.threshold).astype(float)
        acc = _codes(obs.pairs.account[fraud])
        for key, inside in _slices({k: v[fraud] for k, v in obs.pairs.columns.items()}, cfg.slices, len(acc)):
            n = int(inside.sum())
            h = hit[inside]
            value, base = (float(h[:, 1].mean()), float(h[:, 0].mean())) if n else (None, None)
            if n < cfg.min_samples:
                slices.append(SliceJudged(key, n, None, value, base, f"{key}: {n} labelled frauds"))
                continue
            k = 1 - cfg.drop_for(key)
            j = judge(*paired(_moments(k * h[:, 0] - h[:, 1], acc[inside])), a, slice_recall_scale(cfg, key))
            text = f"{key}: recall {value:.3f} vs champion {base:.3f} over {n} frauds{_own_margin(cfg, key)}, {_cs(j)}"
            slices.append(SliceJudged(key, n, j, value, base, text))
    elif obs.baseline is not None:
        masks = [dict(_slices(arm.columns, cfg.slices, len(arm.score))) for arm in (obs.candidate, obs.baseline)]
        for key, _ in slice_keys_named(cfg.slices):
            mc, mb = (
                _slice_caught(arm, mask[key], obs.threshold)
                for arm, mask in zip((obs.candidate, obs.baseline), masks, strict=True)
            )
            n = int(min(mc.n, mb.n))
            value = float(mc.mean) if mc.n else None
            base = float(mb.mean) if mb.n else None
            if n < cfg.min_samples:
                slices.append(SliceJudged(key, n, None, value, base, f"{key}: {int(mc.n)}/{int(mb.n)} labelled frauds"))
                continue
            k = 1 - cfg.drop_for(key)
            est, var = difference(mb, mc, 1.0 / k, 0.0)  # D / k: the same sign
            j = judge(k * est, k * k * var, a, slice_recall_scale(cfg, key))
            text = (
                f"{key}: recall {value:.3f} vs champion {base:.3f} over {int(mc.n)}/{int(mb.n)} frauds"
                f"{_own_margin(cfg, key)}, {_cs(j)}"
            )
            slices.append(SliceJudged(key, n, j, value, base, text))
    else:
        return _no_pairs(cfg, alpha, test, cfg.max_drop)
    return _combine(cfg, a, test, cfg.max_drop, slices, len(slice_keys(cfg.slices)))


def _own_margin(cfg: SliceRecallGuardrail, key: str) -> str:
    return f" (own margin: >= {1 - cfg.max_drop_by_slice[key]:g} x)" if key in cfg.max_drop_by_slice else ""


def _slice_caught(arm: Any, inside: np.ndarray, threshold: float) -> Moments:
    keep = np.isfinite(arm.score) & (arm.label == 1) & inside
    return Moments.proportion((arm.score[keep] >= threshold).astype(float), arm.account[keep])


# ---------------------------------------------------------------- slice decline rate


def slice_decline_rate(cfg: SliceDeclineRateGuardrail, obs: Observations, alpha: Levels) -> GuardrailResult:
    """Per slice, the decline rate within [1 - max_change, 1 + max_change] x the champion's (two contrasts at
    half the slice's budget each). value/baseline: the named slice's decline rates; limit: max_change."""
    test = f"per-slice decline rate within {cfg.max_change:.0%} of the champion's"
    a, m = slice_alpha(alpha, cfg.slices), cfg.max_change
    slices: list[SliceJudged] = []
    if obs.pairs is not None:
        dec = (obs.pairs.scores >= obs.threshold).astype(float)
        codes = _codes(obs.pairs.account)
        for key, inside in _slices(obs.pairs.columns, cfg.slices, len(dec)):
            n = int(inside.sum())
            c, b = dec[inside, 1], dec[inside, 0]
            value, base = (float(c.mean()), float(b.mean())) if n else (None, None)
            if n < cfg.min_samples:
                slices.append(SliceJudged(key, n, None, value, base, f"{key}: {n} scores"))
                continue
            acc = codes[inside]
            hi, lo = mass_change_judgement(None, None, _moments(c - (1 + m) * b, acc), _moments((1 - m) * b - c, acc),
                                           m, a, 0.02 * m, True)  # fmt: skip
            slices.append(
                _two_sided(
                    key, n, hi, lo, value, base, f"{key}: declines {value:.4f} vs champion {base:.4f} over {n} scores"
                )
            )
    elif obs.baseline is not None:
        masks = [dict(_slices(arm.columns, cfg.slices, len(arm.score))) for arm in (obs.candidate, obs.baseline)]
        for key, _ in slice_keys_named(cfg.slices):
            arms = []
            for arm, mask in zip((obs.candidate, obs.baseline), masks, strict=True):
                keep = np.isfinite(arm.score) & mask[key]
                arms.append(Moments.proportion((arm.score[keep] >= obs.threshold).astype(float), arm.account[keep]))
            mc, mb = arms
            n = int(min(mc.n, mb.n))
            value = float(mc.mean) if mc.n else None
            base = float(mb.mean) if mb.n else None
            if n < cfg.min_samples:
                slices.append(SliceJudged(key, n, None, value, base, f"{key}: {int(mc.n)}/{int(mb.n)} scores"))
                continue
            hi, lo = mass_change_judgement(mc, mb, None, None, m, a, 0.02 * m, True)
            text = f"{key}: declines {value:.4f} vs champion {base:.4f} over {int(mc.n)}/{int(mb.n)} scores"
            slices.append(_two_sided(key, n, hi, lo, value, base, text))
    else:
        return _no_pairs(cfg, alpha, test, m)
    return _combine(cfg, a, test, m, slices, len(slice_keys(cfg.slices)))


def _two_sided(
    key: str, n: int, hi: Judgement, lo: Judgement, value: float | None, base: float | None, text: str
) -> SliceJudged:
    """A slice judged by two contrasts: its code is their combination, its CS the one that decides."""
    code = combine_codes(hi, lo)
    shown = hi if int(np.asarray(hi.code)) == FAIL or int(np.asarray(lo.code)) != FAIL else lo
    judged = Judgement(shown.estimate, shown.lower, shown.upper, code)
    return SliceJudged(key, n, judged, value, base, f"{text}, {_cs(shown)}")


# ---------------------------------------------------------------- slice agreement


def slice_agreement(cfg: SliceAgreementGuardrail, obs: Observations, alpha: Levels) -> GuardrailResult:
    """Per slice, in shadow: of the requests either model declines, the share both decline >= min_decline_overlap
    (D = min - overlap, clustered by account). value: the named slice's overlap; limit: min_decline_overlap."""
    test = f"per-slice overlap of the decline sets >= {cfg.min_decline_overlap:g}"
    if obs.pairs is None:
        return _no_pairs(cfg, alpha, test, cfg.min_decline_overlap)
    a = slice_alpha(alpha, cfg.slices)
    dec = obs.pairs.scores >= obs.threshold
    either, both = dec.any(axis=1), dec.all(axis=1)
    codes = _codes(obs.pairs.account)
    slices: list[SliceJudged] = []
    for key, mask in _slices(obs.pairs.columns, cfg.slices, len(dec)):
        inside = mask & either
        mo = _moments(both[inside].astype(float), codes[inside], PROPORTION_PSEUDO)
        n = int(mo.n)
        value = float(mo.mean) if n else None
        if n < cfg.min_samples:
            slices.append(SliceJudged(key, n, None, value, None, f"{key}: {n} declined by either"))
            continue
        j = judge(cfg.min_decline_overlap - mo.mean, mo.variance_of_mean(), a, (1 - cfg.min_decline_overlap) / 2)
        text = f"{key}: {int(mo.s)} declined by both of {n} declined by either ({value:.3f}), {_cs(j)}"
        slices.append(SliceJudged(key, n, j, value, None, text))
    return _combine(cfg, a, test, cfg.min_decline_overlap, slices, len(slice_keys(cfg.slices)))


# ---------------------------------------------------------------- business: fraud amount caught


def fraud_amount_caught(cfg: FraudAmountCaughtGuardrail, obs: Observations, alpha: Levels) -> GuardrailResult:
    """The fraud amount (EUR) caught: D = (1 - max_drop) A_champion - A_challenger per labelled fraud, divided by
    the window's mean fraud amount (see the module docstring); paired in shadow, two arms in a canary.
    value/baseline: the share of the labelled fraud amount each model caught; limit: max_drop."""
    k, scale = 1 - cfg.max_drop, max(0.6 * cfg.max_drop, 0.01)
    test = f"fraud amount caught (EUR) >= {k:g} x the champion's"
    base = obs.baseline
    if base is None:
        return _plain(cfg, alpha, INCONCLUSIVE, None, test, 0, "no champion to compare with", None, None)
    if obs.pairs is not None:
        fraud = obs.pairs.label == 1
        amount = _amounts(obs.pairs.columns, len(fraud))[fraud]
        hit = (obs.pairs.scores[fraud] >= obs.threshold).astype(float)
        keep = np.isfinite(amount)
        amount, hit, acc = amount[keep], hit[keep], obs.pairs.account[fraud][keep]
        n = len(amount)
        total = float(amount.sum())
        caught_c, caught_b = float((amount * hit[:, 1]).sum()), float((amount * hit[:, 0]).sum())
        value, baseline = (caught_c / total, caught_b / total) if total > 0 else (None, None)
        if n < cfg.min_samples or total <= 0:
            detail = f"too few samples: {n} labelled frauds scored by both < {cfg.min_samples}"
            return _plain(cfg, alpha, INCONCLUSIVE, None, test, n, detail, value, baseline)
        mean = total / n
        d = (k * amount * hit[:, 0] - amount * hit[:, 1]) / mean
        j = judge(*paired(Moments.of(d, acc)), alpha, scale)
        detail = (
            f"paired over {n} labelled frauds worth EUR {total:,.0f}: challenger caught EUR {caught_c:,.0f} "
            f"({value:.3f}), champion EUR {caught_b:,.0f} ({baseline:.3f}); {_cs(j)} in mean fraud amounts"
        )
        return _plain(cfg, alpha, int(np.asarray(j.code)), j, test, n, detail, value, baseline)
    arms = []
    for arm in (obs.candidate, base):
        amount = _amounts(arm.columns, len(arm.score))
        keep = np.isfinite(arm.score) & (arm.label == 1) & np.isfinite(amount)
        arms.append((amount[keep], (arm.score[keep] >= obs.threshold).astype(float), arm.account[keep]))
    (ac, hc, acc_c), (ab, hb, acc_b) = arms
    n = min(len(ac), len(ab))
    value = float((ac * hc).sum() / ac.sum()) if ac.sum() > 0 else None
    baseline = float((ab * hb).sum() / ab.sum()) if ab.sum() > 0 else None
    if n < cfg.min_samples or value is None or baseline is None:
        detail = f"too few samples: challenger {len(ac)}, champion {len(ab)} labelled frauds (< {cfg.min_samples})"
        return _plain(cfg, alpha, INCONCLUSIVE, None, test, n, detail, value, baseline)
    mean = float(np.concatenate([ac, ab]).mean())
    mc, mb = Moments.of(ac * hc / mean, acc_c), Moments.of(ab * hb / mean, acc_b)
    est, var = difference(mb, mc, 1.0 / k, 0.0)  # D / k: the same sign
    j = judge(k * est, k * k * var, alpha, scale)
    detail = (
        f"EUR caught per labelled fraud: challenger {float(mc.mean) * mean:,.1f} over {len(ac)} ({value:.3f} of "
        f"its fraud amount), champion {float(mb.mean) * mean:,.1f} over {len(ab)} ({baseline:.3f}); {_cs(j)}"
    )
    return _plain(cfg, alpha, int(np.asarray(j.code)), j, test, n, detail, value, baseline)


def _amounts(columns: dict[str, np.ndarray], size: int) -> np.ndarray:
    values = columns.get(AMOUNT)
    if values is None:
        return np.full(size, np.nan)
    return np.asarray(values, dtype=float)


def _plain(
    cfg: FraudAmountCaughtGuardrail, alpha: Levels, code: int, judged: Judgement | None, test: str, samples: int,
    detail: str, value: float | None, baseline: float | None,
) -> GuardrailResult:  # fmt: skip
    verdict = _VERDICT[code]
    return GuardrailResult(
        name=cfg.name,
        verdict=verdict,
        value=value,
        baseline=baseline,
        limit=cfg.max_drop,
        samples=samples,
        min_samples=cfg.min_samples,
        test=f"{test}; {CS_NAME}; fails at level {alpha.fail:.3g}, passes at {alpha.pass_:.3g}",
        confidence=1 - alpha.fail,
        p_value=None,
        detail=f"{detail}: {verdict}",
        lower=None if judged is None else float(np.asarray(judged.lower)),
        upper=None if judged is None else float(np.asarray(judged.upper)),
    )


SLICE_GUARDRAILS: dict[str, Callable[[Any, Observations, float], GuardrailResult]] = {
    "slice_recall": slice_recall,
    "slice_decline_rate": slice_decline_rate,
    "slice_agreement": slice_agreement,
    "fraud_amount_caught": fraud_amount_caught,
}
