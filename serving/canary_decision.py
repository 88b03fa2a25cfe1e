"""The canary decision: promote, roll back or keep watching, from both sides' outcomes and requests (pure).

The test is the mixture sequential probability ratio test (mSPRT, Johari et al., "Always valid
inference", 2017) on the difference of success rates with a normal mixing prior N(0, tau^2):
its p-values stay valid however often we look, which is what a controller that re-checks every
second needs (a plain z-test re-checked every second would promote noise). It decides once
Lambda >= 1/alpha, promote if the canary is better, roll back if worse. Guards roll back earlier:
the canary's request error rate (from every gateway's ``/stats``) above ``max_error_rate``, or its
p95 latency above ``max_latency_ratio`` x the incumbent's p95 + ``latency_slack_ms``. A canary still
undecided after ``max_samples`` outcomes is rolled back (keep what is known to work). Every threshold
counts outcomes or requests, not time, so a canary at a small share is judged on the same evidence as one
at the full share, only later (an alias with 300 calls a day gives a 1% canary 30 outcomes in 10 days).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from adaptloop.settings import CanarySettings

@dataclass(frozen=True)
class Tally:
    """Outcomes of one side: successes out of n."""

    successes: int = 0
    n: int = 0

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else 0.0


@dataclass(frozen=True)
class RequestStats:
    """Gateway-side numbers of one side: requests, upstream errors, p95 latency (ms)."""

    requests: int = 0
    errors: int = 0
    p95_ms: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Thresholds:
    alpha: float = 0.05
    tau: float = 0.3
    min_samples: int = 30
    max_samples: int = 2000
    max_error_rate: float = 0.05
    min_requests: int = 20
    max_latency_ratio: float = 1.5
    latency_slack_ms: float = 50.0

    @classmethod
    def from_settings(cls, s: CanarySettings) -> "Thresholds":
        return cls(s.alpha, s.tau, s.min_samples, s.max_samples, s.max_error_rate, s.min_requests,
                   s.max_latency_ratio, s.latency_slack_ms)


@dataclass(frozen=True)
class Decision:
    action: str | None  # "promote", "rollback" or None (keep watching)
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


def msprt_log_lambda(canary: Tally, incumbent: Tally, tau: float) -> tuple[float, float]:
    """(difference of success rates, log of the mixture likelihood ratio) for two proportions.

    The variance uses rates smoothed by half an outcome on each side, so that 12/12 vs 0/12 has
    a finite statistic instead of a zero variance.
    """
    if canary.n == 0 or incumbent.n == 0:
        return 0.0, float("-inf")
    delta = canary.rate - incumbent.rate
    pc = (canary.successes + 0.5) / (canary.n + 1)
    pi = (incumbent.successes + 0.5) / (incumbent.n + 1)
    var = pc * (1 - pc) / canary.n + pi * (1 - pi) / incumbent.n
    t2 = tau * tau
    return delta, 0.5 * math.log(var / (var + t2)) + t2 * delta * delta / (2 * var * (var + t2))


def decide(canary: Tally, incumbent: Tally, canary_requests: RequestStats, incumbent_requests: RequestStats,
           t: Thresholds) -> Decision:
    """Promote, roll back, or keep watching; the evidence says why, with every number used."""
    delta, log_lambda = msprt_log_lambda(canary, incumbent, t.tau)
    threshold = math.log(1 / t.alpha)
    evidence = {
        "canary": {"successes": canary.successes, "n": canary.n, "rate": round(canary.rate, 4)} | asdict(canary_requests),
        "incumbent": {"successes": incumbent.successes, "n": incumbent.n, "rate": round(incumbent.rate, 4)}
                     | asdict(incumbent_requests),
        "test": {"name": "mSPRT two proportions", "delta": round(delta, 4),
                 "log_lambda": None if math.isinf(log_lambda) else round(log_lambda, 4),
                 "log_threshold": round(threshold, 4)},
        "thresholds": asdict(t),
    }
    if canary_requests.requests >= t.min_requests:
        if canary_requests.error_rate > t.max_error_rate:
            return Decision("rollback", f"canary error rate {canary_requests.error_rate:.1%} > {t.max_error_rate:.1%}",
                            evidence)
        limit = t.max_latency_ratio * incumbent_requests.p95_ms + t.latency_slack_ms
        if incumbent_requests.requests >= t.min_requests and canary_requests.p95_ms > limit:
            return Decision("rollback", f"canary p95 latency {canary_requests.p95_ms:.0f} ms > {limit:.0f} ms", evidence)
    if canary.n >= t.min_samples and incumbent.n >= t.min_samples and log_lambda >= threshold:
        better = delta > 0
        return Decision("promote" if better else "rollback",
                        f"canary success {canary.rate:.1%} vs incumbent {incumbent.rate:.1%} "
                        f"({'better' if better else 'worse'}; log Lambda {log_lambda:.2f} >= {threshold:.2f})", evidence)
    if canary.n >= t.max_samples:
        return Decision("rollback", f"undecided after {canary.n} canary outcomes", evidence)
    return Decision(None, "watching", evidence)
