"""The gate: a candidate is released only if it beats the incumbent by a margin and forgets nothing.

    candidate vs incumbent on the request's holdout   score >= incumbent + margin
    regression suite: holdouts of earlier live releases of the tenant (any task), each judged by its own
    task; the bar is the score that release recorded on it     score >= bar - regression_tolerance

Scores are validator success rates with a 95% Wilson interval (it stays inside [0, 1] and is sane at
0/n and n/n, where the normal approximation collapses). Every decision carries its evidence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

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
    """The candidate on one earlier release's holdout (schemas: adapter_release.v2 RegressionResult)."""

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


@dataclass(frozen=True)
class Decision:
    passed: bool
    reason: str
    evidence: dict = field(default_factory=dict)


def decide(*, candidate: Mapping[str, Any], incumbent: Mapping[str, Any], margin: float,
           suite: Sequence[SuiteResult], tolerance: float) -> Decision:
    """RELEASED iff the candidate beats the incumbent by ``margin`` and passes every suite entry; pure.

    ``candidate`` / ``incumbent``: {name, score, passed, count, ...} (EvalResult as a dict).
    """
    beats = candidate["score"] >= incumbent["score"] + margin - 1e-9
    failed = [s for s in suite if not s.passed]
    ci = wilson_interval(candidate["passed"], candidate["count"])
    incumbent_ci = wilson_interval(incumbent["passed"], incumbent["count"])
    parts = [f"candidate {candidate['score']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] "
             f"{'>=' if beats else '<'} incumbent {incumbent['name']} {incumbent['score']:.3f} "
             f"[{incumbent_ci[0]:.2f}, {incumbent_ci[1]:.2f}] + margin {margin:.3f} on {candidate['count']} holdout {candidate.get('unit', 'example')}s"]
    if failed:
        parts.append("regression: " + ", ".join(
            f"{s.task} holdout of {s.source_version} {s.candidate_score:.3f} < bar {s.incumbent_score:.3f} - {tolerance:.3f}"
            for s in failed))
    elif suite:
        parts.append(f"regression suite passed ({len(suite)} earlier holdouts)")
    evidence = {
        "rule": "candidate >= incumbent + margin and every suite score >= bar - tolerance",
        "margin": margin, "regression_tolerance": tolerance,
        "candidate": dict(candidate) | {"ci95": list(ci)},
        "incumbent": dict(incumbent) | {"ci95": list(incumbent_ci)},
        "beats_incumbent": beats,
        # Informational: with small holdouts the margin can be met while the intervals overlap.
        "ci_separated": ci[0] > incumbent_ci[1],
        "regression": [s.record() for s in suite],
    }
    return Decision(beats and not failed, "; ".join(parts), evidence)
