"""Loop latency shaping: timestamps from records and the trainer log -> stages, slowest named."""

from __future__ import annotations

import datetime as dt

from adaptloop.ops.loop_latency import breakdown, parse_trainer_log, release_stamps

RID = "abcdef1234567890" * 4


def _log_time(epoch_ms: int) -> str:
    return dt.datetime.fromtimestamp(epoch_ms / 1000).strftime("%Y-%m-%d %H:%M:%S,") + f"{epoch_ms % 1000:03d}"


def test_trainer_log_stages_are_found_for_their_request_only():
    t = 1_800_000_000_000
    text = "\n".join([
        f"{_log_time(t)} INFO adaptloop.trainer: request 999999999999: acme/order-extract trigger=count>=16 ranges=[]",
        f"{_log_time(t + 1000)} INFO adaptloop.trainer: request {RID[:12]}: acme/order-extract trigger=count>=16 ranges=[(0, 0, 20)]",
        f"{_log_time(t + 1500)} INFO adaptloop.trainer: request {RID[:12]}: acme/order-extract snapshot sha256:ab at /tmp/datasets/ab: 16 train, 4 holdout, 0 dropped; method sft (successes)",
        "(RayTrainWorker pid=1) request abcdef123456 step 2/4 loss 1.0",
        f"{_log_time(t + 41_250)} INFO adaptloop.trainers.ray_job: request {RID[:12]}: ray job finished in 39.0s",
    ])
    assert parse_trainer_log(text, RID) == {"picked_up": t + 1000, "snapshot": t + 1500, "trained": t + 41_250}
    assert parse_trainer_log(text, "f" * 64) == {}
    # The same request id in a later run (the log is appended to): only the run in the window counts.
    later = t + 3 * 3600_000
    again = "\n".join(line.replace(_log_time(t + d), _log_time(later + d))
                       for line, d in zip(text.splitlines(), (0, 1000, 1500, 0, 41_250)))
    both = text + "\n" + again
    assert parse_trainer_log(both, RID, not_before_ms=later - 60_000, not_after_ms=later + 60_000) == {
        "picked_up": later + 1000, "snapshot": later + 1500, "trained": later + 41_250}
    assert parse_trainer_log(both, RID, not_before_ms=t - 60_000, not_after_ms=t + 60_000) == {
        "picked_up": t + 1000, "snapshot": t + 1500, "trained": t + 41_250}


def test_breakdown_names_the_slowest_stage_and_folds_the_trainer_without_its_log():
    stamps = {"outcome_recorded": 0, "curated": 200, "request": 300, "picked_up": 1300, "snapshot": 1800,
              "trained": 41_800, "released": 61_800, "loaded": 62_100, "routed": 63_000}
    result = breakdown(stamps)
    assert result["stages"] == {"curation": 0.2, "request": 0.1, "trainer queue": 1.0, "snapshot": 0.5,
                                "training": 40.0, "evaluation": 20.0, "sidecar load": 0.3, "gateway routing": 0.9}
    assert result["slowest"] == "training" and result["total_s"] == 63.0
    assert abs(sum(result["share"].values()) - 1) < 0.01
    folded = breakdown({k: v for k, v in stamps.items() if k not in ("picked_up", "snapshot", "trained")})
    assert list(folded["stages"]) == ["curation", "request", "trainer", "sidecar load", "gateway routing"]
    assert folded["stages"]["trainer"] == 61.5 and folded["slowest"] == "trainer"


def test_release_stamps_start_at_the_example_that_fired_the_request():
    request = {"request_id": RID, "created_at": 5000,
               "examples": [{"topic": "c", "partition": 1, "start_offset": 0, "end_offset": 10}]}
    curated = {(1, 9): {"curated_at": 4000, "event_time": 1000,
                        "lineage": {"winning_outcome_id": "o9", "outcome_ids": ["o9"]}},
               (1, 8): {"curated_at": 3000, "event_time": 900, "lineage": {}}}
    outcomes = {"o9": {"event_time": 3500}}
    stamps = release_stamps({"created_at": 9000}, request, curated, outcomes, 9900, 9500, None)
    assert stamps == {"request": 5000, "released": 9000, "loaded": 9500, "routed": 9900, "curated": 4000,
                      "outcome_recorded": 3500}
    assert breakdown(stamps)["stages"]["curation"] == 0.5
