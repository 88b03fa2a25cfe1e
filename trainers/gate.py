"""The gate: candidate and incumbent answer the same holdout, so they are compared pair by pair.

    item i of the holdout, judged for both      b = pairs the candidate passes and the incumbent fails
                                                c = pairs the incumbent passes and the candidate fails
    exact one-sided sign test on the n = b + c discordant pairs (binomial, p = 1/2; McNemar's exact test)
        p_better = P(X >= b | n)                (1 when n = 0: nothing tells the two apart)
    regression suite: holdouts of earlier live releases of the tenant (any task), each judged by its own
    task; the bar is the score that release recorded on it     score >= bar - regression_tolerance

Outcomes, with ``alpha = 1 - confidence`` (``TrainerSettings.gate_confidence``):

    regression suite fails                              REJECTED
    b < c                                               REJECTED   "worse" (on the pairs that differ), significant or not
    p_better <= alpha, score >= incumbent + margin      RELEASED   "better": the gateways' canary share
    p_better <= alpha, gain below the margin            REJECTED   "not better" (better, but by less than the margin)
    otherwise (b >= c, not significant; n = 0 too,      RELEASED   "undecided": the holdout is too small to decide, so
    e.g. both saturated at 23/23)                                  production outcomes do (the canary controller), at
                                                                   canary_share x max(0.1, 1 - p_better)

The undecided share grows with the evidence: no discordant pair gives a tenth of the canary share, 1 of 1 in
the candidate's favour (p = 0.5) half of it, 4 of 4 (p = 0.0625) 94% of it. It is written on the release
(``canary_share``, adapter_release.v3); a "better" release carries none, and every gateway gives it its own
``canary_share``.

The scores' 95% Wilson intervals (inside [0, 1] and sane at 0/n and n/n, where the normal approximation
collapses) stay in the evidence as information: unpaired intervals overlap long after the pairs decide.
Every decision carries its evidence: the test, b, c, n, p_better, alpha, the verdict and the share given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from adaptloop.errors import TrainingError

Z95 = 1.959963984540054


def wilson_interval(passed: int, count: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a success rate ``passed / count``; (0, 0) for no trials."""
    if count <= 0:
        return 0.0, 0.0
    p = passed / count
    denominator = 1 + z * z / count
    centre = (p + z * z / (2 * count)) / denominator
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / denominator
    low = 0.0 if passed <= 0 else max(0.0, centre - half)  # exact at the edges (no rounding residue)
    high = 1.0 if passed >= count else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class SuiteResult:
    """The candidate on one earlier release's holdout (schemas: adapter_release.v3 RegressionResult)."""

    task: str
    source_version: str
    holdout_count: int
    candidate_score: float
    incumbent_score: float  # the bar: what the source release scored on this holdout
    passed: bool

    def record(self) -> dict[str, Any]:
        return asdict(self)


def regression_result(*, task: str, source_version: str, holdout_count: int, candidate_score: float,
                      bar: float, tolerance: float) -> SuiteResult:
    return SuiteResult(task, source_version, holdout_count, candidate_score, bar,
                       candidate_score >= bar - tolerance - 1e-9)


#: What the evidence names the test by.
SIGN_TEST = "exact sign test on discordant pairs"
#: An undecided candidate's share is at least this fraction of the canary share.
UNDECIDED_MIN_SCALE = 0.1


def sign_test(b: int, c: int) -> float:
    """One-sided exact sign test: P(X >= b) for X ~ Binomial(b + c, 1/2); 1.0 when there is no discordant pair.

    scipy's ``binomtest`` (scipy ships with the trainer's dependencies); equal to
    ``sum(comb(n, k) for k in range(b, n + 1)) / 2**n``.
    """
    from scipy.stats import binomtest

    n = b + c
    if n == 0:
        return 1.0
    return float(binomtest(b, n, 0.5, alternative="greater").pvalue)


def discordant_pairs(candidate: Mapping[str, Any], incumbent: Mapping[str, Any]) -> tuple[int, int]:
    """(b, c): holdout items only the candidate passes, only the incumbent passes. Both must be verdicts on the
    same items in the same order (``EvalResult.verdicts`` / ``items``), else ``TrainingError``."""
    mine, theirs = list(candidate["verdicts"]), list(incumbent["verdicts"])
    if len(mine) != len(theirs) or len(mine) != candidate["count"] or len(theirs) != incumbent["count"]:
        raise TrainingError(f"candidate ({len(mine)} verdicts of {candidate['count']}) and incumbent ({len(theirs)} of "
                            f"{incumbent['count']}) were not judged on the same holdout: no pairs to compare")
    if not mine:
        raise TrainingError("no holdout items were judged: nothing to compare")
    items, other = list(candidate.get("items") or ()), list(incumbent.get("items") or ())
    if items and other and items != other:
        raise TrainingError("candidate and incumbent were judged on the same number of holdout items, but not on the "
                            "same items in the same order: no pairs to compare")
    b = sum(1 for x, y in zip(mine, theirs) if x and not y)
    c = sum(1 for x, y in zip(mine, theirs) if y and not x)
    return b, c


@dataclass(frozen=True)
class Decision:
    passed: bool  # RELEASED: the candidate goes to the canary ("better" or "undecided")
    reason: str
    evidence: dict = field(default_factory=dict)
    verdict: str = ""  # better | undecided | not better | worse
    canary_share: float | None = None  # an undecided release's own share; None: the gateways' canary_share


def decide(*, candidate: Mapping[str, Any], incumbent: Mapping[str, Any], margin: float,
           suite: Sequence[SuiteResult], tolerance: float, confidence: float = 0.95,
           canary_share: float = 0.1) -> Decision:
    """RELEASED ("better" or "undecided", with its share) or REJECTED; pure. See the module's table.

    ``candidate`` / ``incumbent``: {name, score, passed, count, verdicts, items, ...} (EvalResult as a dict) on the
    same holdout; ``confidence``: of the sign test (alpha = 1 - confidence); ``canary_share``: the share the
    gateways give a canary, which an undecided candidate gets a fraction of.
    """
    alpha = 1.0 - confidence
    b, c = discordant_pairs(candidate, incumbent)
    n = b + c
    p_better = sign_test(b, c)
    gain = candidate["score"] - incumbent["score"]
    beats = gain >= margin - 1e-9
    significant = p_better <= alpha + 1e-12
    if b < c:
        verdict = "worse"
    elif significant:
        verdict = "better" if beats else "not better"
    else:
        verdict = "undecided"
    failed = [s for s in suite if not s.passed]
    released = not failed and verdict in ("better", "undecided")
    share = (round(canary_share * max(UNDECIDED_MIN_SCALE, 1.0 - p_better), 4)
             if released and verdict == "undecided" else None)

    ci = wilson_interval(candidate["passed"], candidate["count"])
    incumbent_ci = wilson_interval(incumbent["passed"], incumbent["count"])
    unit = candidate.get("unit", "example")
    pairs = f"{n} of {candidate['count']} holdout {unit}s differ: {b} only the candidate passes, {c} only the incumbent"
    scores = (f"candidate {candidate['score']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] vs incumbent {incumbent['name']} "
              f"{incumbent['score']:.3f} [{incumbent_ci[0]:.2f}, {incumbent_ci[1]:.2f}]")
    test = f"sign test p_better={p_better:.4g} {'<=' if significant else '>'} alpha {alpha:.3g}"
    if verdict == "better":
        head = f"better: {scores}, gain {gain:.3f} >= margin {margin:.3f}; {pairs}; {test}"
    elif verdict == "not better":
        head = f"not better: {scores}, gain {gain:.3f} < margin {margin:.3f} although {test}; {pairs}"
    elif verdict == "worse":
        head = f"worse on the pairs that differ: {scores}; {pairs}; {test}"
    else:
        head = f"undecided: {scores}; {pairs}; {test}: this holdout cannot tell them apart"
        if released:
            head += f" -> canary at share {share:.4g}"
    parts = [head]
    if failed:
        parts.append("regression: " + ", ".join(
            f"{s.task} holdout of {s.source_version} {s.candidate_score:.3f} < bar {s.incumbent_score:.3f} - {tolerance:.3f}"
            for s in failed))
    elif suite:
        parts.append(f"regression suite passed ({len(suite)} earlier holdouts)")
    per_item = ("verdicts", "items")  # one entry per holdout item: the test below sums them up
    evidence = {
        "rule": ("paired: exact one-sided sign test on the holdout pairs where candidate and incumbent differ; "
                 "RELEASED if better (p_better <= alpha and gain >= margin) or undecided (not worse, not "
                 "significant: canary at a share set by p_better); every suite score >= bar - tolerance"),
        "test": {"name": SIGN_TEST, "b": b, "c": c, "n": n, "holdout": candidate["count"], "unit": unit,
                 "p_better": p_better, "alpha": round(alpha, 6), "confidence": confidence},
        "verdict": verdict,
        "canary_share": share,
        "margin": margin, "gain": gain, "regression_tolerance": tolerance,
        "candidate": {k: v for k, v in candidate.items() if k not in per_item} | {"ci95": list(ci)},
        "incumbent": {k: v for k, v in incumbent.items() if k not in per_item} | {"ci95": list(incumbent_ci)},
        "beats_incumbent": beats,
        # Informational: unpaired intervals; the decision is the paired test's.
        "ci_separated": ci[0] > incumbent_ci[1],
        "regression": [s.record() for s in suite],
        "regression_passed": not failed,
    }
    return Decision(released, "; ".join(parts), evidence, verdict, share)
