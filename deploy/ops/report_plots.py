"""The report's PNG plots (``adaptloop report``): success over time, training loss, the data funnel.

Drawn with matplotlib's Agg backend (no display needed), imported only when a report is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from adaptloop.ops.report_data import ROLLING_WINDOW, Pair, Verdict, rolling_success
from adaptloop.schemas.contract import SERVABLE, ReleaseState

#: Drawn red: the gate or the canary refused the adapter (a retired one did its time and is drawn grey).
BAD_STATES = (ReleaseState.REJECTED, ReleaseState.ROLLED_BACK)
#: A pause in traffic longer than this breaks the rolling line.
GAP_MS = 30_000


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def short_version(version: str) -> str:
    return version.rsplit("--", 1)[-1][:12]


def _minutes(at_ms: int, origin_ms: int) -> float:
    return (at_ms - origin_ms) / 60_000


def _state_colour(state: str) -> str:
    return "tab:green" if state in SERVABLE else "tab:red" if state in BAD_STATES else "tab:gray"


def plot_success(path: Path, pair: Pair, points: Sequence[Verdict], marks: Sequence[Mapping[str, Any]],
                 measurements: Sequence[Mapping[str, Any]], origin_ms: int) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    if points:
        xs = [_minutes(p.at_ms, origin_ms) for p in points]
        ax.scatter(xs, [1.02 if p.ok else -0.02 for p in points], s=8, alpha=0.35, color="tab:blue",
                   label="one verdict (curated example)")
        xs, ys, previous = [], [], None
        for t, v in rolling_success(points):
            if previous is not None and t - previous > GAP_MS:  # no line across a pause in traffic
                xs.append(float("nan"))
                ys.append(float("nan"))
            xs.append(_minutes(t, origin_ms))
            ys.append(v)
            previous = t
        ax.plot(xs, ys, color="tab:blue", drawstyle="steps-post", label=f"rolling success (last {ROLLING_WINDOW})")
    for mark in marks:
        x = _minutes(mark["at_ms"], origin_ms)
        ax.axvline(x, color=_state_colour(mark["state"]), linestyle="--", linewidth=1)
        ax.text(x, 0.5, f" {mark['state']} {short_version(mark['version'])}", rotation=90, fontsize=7,
                va="center", color=_state_colour(mark["state"]))
    if measurements:
        ax.plot([_minutes(m["at_ms"], origin_ms) for m in measurements], [m["success"] for m in measurements], "o",
                color="tab:orange", markersize=9, label="demo measurement (fresh cases)")
        for m in measurements:
            ax.annotate(f"{m['success']:.0%}", (_minutes(m["at_ms"], origin_ms), m["success"]),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_ylim(-0.08, 1.12)
    ax.set_xlabel("minutes since the first record")
    ax.set_ylabel("validator success of the served agent")
    ax.set_title(f"{pair[0]} / {pair[1]}: success over time, releases marked")
    ax.legend(loc="upper left", fontsize=7)
    _save(plt, fig, path)


def plot_losses(path: Path, pair: Pair, curves: Mapping[str, Sequence[tuple[float, float]]]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for version, curve in curves.items():
        ax.plot([s for s, _ in curve], [loss for _, loss in curve], marker=".", label=short_version(version))
    if not curves:
        ax.text(0.5, 0.5, "no loss curve recorded in any release (training_json)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{pair[0]} / {pair[1]}: training loss per release")
    if curves:
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_funnel(path: Path, pair: Pair, counts: Mapping[str, int]) -> None:
    plt = _pyplot()
    names = list(counts)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    bars = ax.barh(names, [counts[n] for n in names], color=["tab:red" if n.startswith(("rejected", "dead"))
                                                              else "tab:blue" for n in names])
    ax.bar_label(bars, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"{pair[0]} / {pair[1]}: data funnel")
    _save(plt, fig, path)
