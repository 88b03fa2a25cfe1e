"""Crash safety with real workers: SIGKILL mid-stream at a random moment, SIGKILL exactly as a window
fires (before and after its request is sent), and two workers sharing the partitions, one of them killed.
After each: every admitted example is in the datasets exactly once (per example id), none lost, and
exactly one training request per window (repeats carry the same request id; the trainer dedupes by it).

    $ADAPTLOOP_HOME/venv/bin/python -m pytest tests/integration/test_curation_crash.py -x
"""

from __future__ import annotations

import os
import random
import time
import uuid

import pytest

from adaptloop.demo_tasks import OrderGenerator
from adaptloop.ops.stack import start_service
from adaptloop.sdk import Recorder
from curation_helpers import READY_TIMEOUT_S, TASK, dataset_of, get_json, messages, read_all, wait_until, worker_env

pytestmark = pytest.mark.integration

TENANT = "acme"
WINDOW = 4


def send_pairs(kafka, topics, cases, tag: str) -> list[str]:
    """Admitted TRAIN examples (holdout 0): a human correction each, so each is curated at once."""
    ids = []
    with Recorder(kafka, topics) as rec:
        for n, case in enumerate(cases):
            iid = f"{tag}-{n}-{uuid.uuid4().hex[:6]}"
            ids.append(iid)
            rec.interaction(interaction_id=iid, tenant=TENANT, agent="bot", task=TASK, session_id=iid,
                            messages=messages(case.sentence), response="?")
            rec.outcome(iid, tenant=TENANT, source="HUMAN", success=False, correction=case.answer)
    return ids


def check_exactly_once(kafka, topics, ids: list[str], timeout_s: float = 90.0) -> list[dict]:
    """Every id curated and admitted (repeats identical), one request id per window, datasets exact."""
    curated = wait_until(kafka, topics.name("curated"), "curated_example",
                         lambda rs: set(ids) <= {r["example_id"] for _, _, r in rs}, timeout_s=timeout_s)
    by_id: dict[str, dict] = {}
    for _, _, record in curated:
        first = by_id.setdefault(record["example_id"], record)
        # A repeat after a crash is the same example: same decision, same content.
        assert (record["admitted"], record["split"], record["content_hash"]) == \
               (first["admitted"], first["split"], first["content_hash"]), record["example_id"]
    assert all(by_id[i]["admitted"] and by_id[i]["split"] == "TRAIN" for i in ids)
    windows = len(ids) // WINDOW
    records = wait_until(kafka, topics.name("training_requests"), "training_request",
                         lambda rs: len({r["request_id"] for _, _, r in rs}) >= windows, timeout_s=timeout_s)
    time.sleep(3)  # room for a wrong extra request
    records = read_all(kafka, topics.name("training_requests"), "training_request")
    requests = {r["request_id"]: r for _, _, r in records}
    assert len(requests) == windows, [(r["train_count"], r["request_id"][:8]) for _, _, r in records]
    counts = sorted(r["train_count"] for r in requests.values())
    assert counts == [WINDOW * (n + 1) for n in range(windows)], counts
    previous: set[str] = set()
    for request in sorted(requests.values(), key=lambda r: r["train_count"]):
        dataset = dataset_of(kafka, request)
        assert len(dataset) == request["train_count"], (len(dataset), request["train_count"])
        assert set(dataset) >= previous and set(dataset) <= set(ids)  # cumulative, nothing foreign
        previous = set(dataset)
    assert len(previous) == windows * WINDOW
    return list(requests.values())


def check_with_a_fresh_worker(kafka, topics, home, env: dict[str, str], ids: list[str]) -> list[dict]:
    """Start a worker with no crash point and check exactly once; the requests."""
    worker = start_service("streams", home, env, timeout_s=READY_TIMEOUT_S)
    try:
        requests = check_exactly_once(kafka, topics, ids)
        assert worker.alive(), worker.tail()
        return requests
    finally:
        worker.stop()


def test_kill_at_a_random_point_mid_stream(kafka, topics, tmp_path):
    seed = int(os.environ.get("ADAPTLOOP_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"crash seed {seed} (re-run with ADAPTLOOP_CRASH_SEED={seed})")
    home = tmp_path / "home"
    env = worker_env(kafka, topics, home, window_size=str(WINDOW), holdout_percent="0", window_max_age_s="3600")
    cases = OrderGenerator(seed=123).cases(24)  # fixed content; the seed picks the moment of the kill
    first = start_service("streams", home, env, timeout_s=READY_TIMEOUT_S)
    try:
        ids = send_pairs(kafka, topics, cases, "r")
        delay = rng.uniform(0.2, 3.0)
        time.sleep(delay)
        print(f"SIGKILL after {delay:.2f}s")
        first.kill()
    finally:
        first.stop()
    check_with_a_fresh_worker(kafka, topics, home, env, ids)


def run_until_crash_point(home, env: dict[str, str], point: str) -> None:
    """A worker that SIGKILLs itself at ``point``; not waiting for readiness: replaying the previous
    worker's pending request may reach the crash point before this worker has declared itself ready."""
    process = start_service("streams", home, env | {"ADAPTLOOP_STREAMS_CRASH_POINT": point}, wait_ready=False)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S + 90
        while process.alive():
            assert time.monotonic() < deadline, f"never reached crash point {point}"
            time.sleep(0.2)
        assert f"crash point {point} reached" in process.log_path.read_text(), process.tail()
    finally:
        process.stop()


def test_kill_right_as_a_window_fires(kafka, topics, tmp_path):
    """Worker 1 dies after a request is decided but before it is sent; worker 2 dies right after
    sending one; worker 3 finishes. Still one request per window."""
    home = tmp_path / "home"
    base = worker_env(kafka, topics, home, window_size=str(WINDOW), holdout_percent="0", window_max_age_s="3600")
    ids = send_pairs(kafka, topics, OrderGenerator(seed=77).cases(3 * WINDOW), "w")
    for point in ("request_pending", "request_sent"):
        run_until_crash_point(home, base, point)
    requests = check_with_a_fresh_worker(kafka, topics, home, base, ids)
    assert {r["trigger"] for r in requests} == {f"count>={WINDOW}"}


def test_a_request_left_pending_by_a_crash_goes_out_before_the_next_window_fires(kafka, topics, tmp_path):
    """The tick resends a pending request, but the next worker's window agent may fire the next window
    first (here always: neither worker ticks, so no tick record, old or new, reaches the tick agent).
    Deciding that one must not replace the pending one."""
    home = tmp_path / "home"
    base = worker_env(kafka, topics, home, window_size=str(WINDOW), holdout_percent="0", window_max_age_s="3600",
                      tick_s="3600")
    ids = send_pairs(kafka, topics, OrderGenerator(seed=78).cases(3 * WINDOW), "p")
    run_until_crash_point(home, base, "request_pending")
    check_with_a_fresh_worker(kafka, topics, home, base, ids)


def test_two_workers_split_the_partitions_and_survive_one_dying(kafka, topics, tmp_path):
    app_id = f"curation-{uuid.uuid4().hex[:8]}"
    envs = [worker_env(kafka, topics, tmp_path / f"home{n}", app_id=app_id, window_size=str(WINDOW),
                       holdout_percent="0", window_max_age_s="3600") for n in range(2)]
    first = start_service("streams", tmp_path / "home0", envs[0], timeout_s=READY_TIMEOUT_S)
    second = None
    try:
        second = start_service("streams", tmp_path / "home1", envs[1], timeout_s=READY_TIMEOUT_S)
        ids = send_pairs(kafka, topics, OrderGenerator(seed=88).cases(16), "a")
        # Both workers curate some of them: the partitions are split between them.
        deadline = time.monotonic() + 60
        while True:
            done = [get_json(e["ADAPTLOOP_STREAMS_WEB_PORT"], "/adaptloop/metrics")["stages"]
                    .get("join", {}).get("admitted", 0) for e in envs]
            if all(done):
                break
            assert time.monotonic() < deadline, f"the partitions were not shared: admitted per worker {done}"
            time.sleep(0.5)
        second.kill()
        ids += send_pairs(kafka, topics, OrderGenerator(seed=89).cases(16), "b")  # all partitions, one worker left
        check_exactly_once(kafka, topics, ids, timeout_s=120)
        assert first.alive(), first.tail()
    finally:
        if second is not None:
            second.stop()
        first.stop()
