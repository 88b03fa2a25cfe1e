"""Curation scenarios against ONE real Faust worker (module fixture) on the session's Tansu broker:
a malformed-record corpus, join order / horizon / precedence, PII, dedupe + leak-proof split,
windows (count and age) with tenant isolation, erasures, metrics. Each scenario uses its own tenant.

    $ADAPTLOOP_HOME/venv/bin/python -m pytest tests/integration/test_curation.py -x
"""

from __future__ import annotations

import io
import json
import math
import time
import uuid
from pathlib import Path

import fastavro
import pytest
from confluent_kafka import Producer
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from adaptloop.demo_tasks import OrderGenerator
from adaptloop.erasure import build_erasure, subject_key
from adaptloop.kafka import DeliveryTracker, read_ranges
from adaptloop.ops.stack import start_service
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.sdk import Recorder, build_interaction, build_outcome
from adaptloop.settings import SUBJECT_SECRET_FILE, ErasureSettings, Topics
from adaptloop.streams import stages, windows
from adaptloop.tasks import example_catalogue
from curation_helpers import (READY_TIMEOUT_S, TASK, dataset_of, get_json, get_text, messages, read_all,
                              wait_until, worker_env)

pytestmark = pytest.mark.integration

TENANTS = ["acme", "pii", "dup", "ta", "tb", "er", "dlq", "val", "ep"]
#: Two tasks of a user's catalogue, beside the example's (validator kinds, by task).
TASKS = {"intent": "regex", "ticket": "json_schema", "support": "regex"}
EXTRA_TASKS = """
  intent:
    validator: {kind: regex, pattern: "(refund|cancel|other)"}
  support:
    validator: {kind: regex, pattern: "(?s).+"}
  ticket:
    validator:
      kind: json_schema
      schema: {type: object, required: [id], properties: {id: {type: integer}}}
"""
WINDOW_SIZE, MAX_AGE_S, MIN_EXAMPLES, HOLDOUT = 3, 4, 2, 30
MAX_BYTES = 20_000


@pytest.fixture(scope="module")
def env(kafka, module_topics, tmp_path_factory):
    home = tmp_path_factory.mktemp("curation")
    return home, worker_env(kafka, module_topics, home, tenants=TENANTS, window_size=str(WINDOW_SIZE),
                            window_max_age_s=str(MAX_AGE_S), window_min_examples=str(MIN_EXAMPLES),
                            holdout_percent=str(HOLDOUT), max_record_bytes=str(MAX_BYTES),
                            pii_patterns={"employee": r"\bEMP-\d{6}\b"}, extra_tasks=EXTRA_TASKS)


@pytest.fixture(scope="module")
def worker(env):
    home, environment = env
    process = start_service("streams", home, environment, timeout_s=READY_TIMEOUT_S)
    try:
        yield process
    finally:
        process.stop()


def subject_of(env, tenant: str, value: str) -> str:
    """The key the worker gives a subject: under the secret of its deployment (its home)."""
    return subject_key(tenant, value, ErasureSettings(subject_secret_file=env[0] / SUBJECT_SECRET_FILE).secret())


def port(env) -> str:
    return env[1]["ADAPTLOOP_STREAMS_WEB_PORT"]


def curated_by_id(kafka, topics, ids, timeout_s=60.0) -> dict[str, dict]:
    records = wait_until(kafka, topics.name("curated"), "curated_example",
                         lambda rs: set(ids) <= {r["example_id"] for _, _, r in rs}, timeout_s=timeout_s)
    return {r["example_id"]: r for _, _, r in records if r["example_id"] in set(ids)}


def session_with(split: str, tenant: str, avoid: set[str] = frozenset()) -> str:
    return next(s for n in range(1000) if (s := f"{tenant}-s{n}") not in avoid
                and stages.split(tenant, TASK, s, HOLDOUT) == split)


# ------------------------------------------------------------------ malformed-record corpus

def _single_object(schema: dict, record: dict) -> bytes:
    parsed = parse_schema(schema)
    digest = int(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"), 16)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, parsed, record)
    return b"\xc3\x01" + digest.to_bytes(8, "little") + body.getvalue()


def malformed_corpus(topics: Topics) -> list[tuple[str, str, bytes | None, bytes | None, str]]:
    """(kind, topic, key, value, expected reason) -- written by a plain Kafka producer, no adaptloop serde in the way."""
    i_topic, o_topic = topics.name("interactions"), topics.name("outcomes")
    iser, oser = serde_for("interaction").serialize, serde_for("outcome").serialize

    def inter(iid: str, **overrides) -> dict:
        fields = dict(interaction_id=iid, tenant="dlq", agent="bot", task=TASK, session_id="dlq-s",
                      messages=messages("Alice wants 3 lamps"), response="{}", base_model="m")
        return build_interaction(**(fields | overrides))

    def enc(record: dict) -> bytes:
        return iser(record, SerdeContext(i_topic))

    def out(iid: str, **overrides) -> bytes:
        record = build_outcome(iid, tenant=overrides.pop("tenant", "dlq"), source="VALIDATOR", **overrides)
        return oser(record, SerdeContext(o_topic))

    good = enc(inter("m-good"))
    bad_utf8 = enc(inter("m-utf8", messages=messages("XXXXXXXXXXXX"))).replace(b"XXXXXXXXXXXX", b"\xff\xfe" * 6)
    with open(Path(__file__).resolve().parents[2] / "schemas" / "avro" / "interaction.v1.avsc") as f:
        schema = json.load(f)
    schema_missing = dict(schema, fields=[f for f in schema["fields"] if f["name"] != "agent"])
    missing = _single_object(schema_missing, {k: v for k, v in inter("m-missing").items() if k != "agent"})
    curated = serde_for("curated_example").serialize(stages.curate(
        inter("m-cur", response=json.dumps({"a": 1})), [(build_outcome("m-cur", tenant="dlq", source="HUMAN", success=True),
                                                        stages.SourceRef("o", 0, 0))],
        interaction_ref=stages.SourceRef("i", 0, 0), spec=example_catalogue().get(TASK), holdout_percent=0,
        horizon_ms=1000), SerdeContext(o_topic))
    future = stages.now_ms() + 3_600_000
    return [
        ("plain text", i_topic, b"m1", b"this is not avro", "not Avro single-object"),
        ("empty bytes", i_topic, b"m2", b"", "not Avro single-object"),
        ("tombstone", o_topic, b"m3", None, "tombstone"),
        ("JSON", i_topic, b"m4", b'{"interaction_id": "m4"}', "not Avro single-object"),
        ("wrong magic", i_topic, b"m-good", b"\xc3\x02" + good[2:], "not Avro single-object"),
        ("unknown fingerprint", i_topic, b"m-good", good[:2] + b"\x01" * 8 + good[10:], "unknown schema fingerprint"),
        ("required field missing", i_topic, b"m-missing", missing, "unknown schema fingerprint"),
        ("truncated", i_topic, b"m-good", good[: len(good) // 2], "corrupt adaptloop.Interaction body"),
        ("trailing garbage", i_topic, b"m-good", good + b"\x00\x07", "trailing bytes"),
        ("invalid UTF-8", i_topic, b"m-utf8", bad_utf8, "corrupt adaptloop.Interaction body"),
        ("Confluent wire format", i_topic, b"m-good", b"\x00\x00\x00\x00\x07" + good[10:], "not Avro single-object"),
        ("an outcome on the interactions topic", i_topic, b"m5", out("m5", success=True), "wrong record type"),
        ("a curated example on the outcomes topic", o_topic, b"m-cur", curated, "wrong record type"),
        ("oversized", i_topic, b"m6", enc(inter("m6", messages=messages("x" * (MAX_BYTES + 10)))), "exceeds max_record_bytes"),
        ("key not UTF-8", i_topic, b"\xff\xfe", good, "not UTF-8"),
        ("key is not the id", i_topic, b"other", good, "the key of what the record is about"),
        ("no key", i_topic, None, good, "the key of what the record is about"),
        ("negative latency", i_topic, b"m7", enc(inter("m7", latency_ms=-5.0)), "negative latency_ms"),
        ("NaN latency", i_topic, b"m8", enc(inter("m8", latency_ms=math.nan)), "not a finite number"),
        ("negative tokens", i_topic, b"m9", enc(inter("m9", prompt_tokens=-1)), "negative token count"),
        ("event time far in the future", i_topic, b"m10", enc(inter("m10", event_time=future)), "in the future"),
        ("event time zero", i_topic, b"m11", enc(inter("m11", event_time=0)), "not after 1970"),
        ("unknown tenant", i_topic, b"m12", enc(inter("m12", tenant="mallory")), "unknown tenant 'mallory'"),
        ("unknown task", i_topic, b"m13", enc(inter("m13", task="no-such-task")), "unknown task 'no-such-task'"),
        ("empty interaction id", i_topic, b"", enc(inter("x") | {"interaction_id": ""}), "empty interaction_id"),
        ("no request messages", i_topic, b"m14", enc(inter("m14", messages=[])), "no request messages"),
        ("outcome without a verdict", o_topic, b"m15", out("m15"), "no verdict"),
        ("outcome NaN score", o_topic, b"m16", out("m16", score=math.nan), "not a finite number"),
        ("outcome unknown tenant", o_topic, b"m17", out("m17", success=True, tenant="mallory"), "unknown tenant"),
    ]


def test_malformed_corpus_lands_in_dead_letters_and_the_stream_goes_on(kafka, module_topics, worker, env):
    corpus = malformed_corpus(module_topics)
    assert len(corpus) >= 20
    producer = Producer(kafka.client_config() | {"acks": "all"})  # a plain client: knows nothing of our schemas
    offsets: dict[tuple[str, int, int], int] = {}
    for n, (_, topic, key, value, _) in enumerate(corpus):
        producer.produce(topic, key=key, value=value,
                         on_delivery=lambda err, msg, n=n: offsets.__setitem__((msg.topic(), msg.partition(), msg.offset()), n))
        producer.flush(30)
    assert len(offsets) == len(corpus)
    # ... and a good pair afterwards: the pipeline never stopped.
    case = OrderGenerator(seed=99).case()
    with Recorder(kafka, module_topics) as recorder:
        recorder.interaction(interaction_id="dlq-ok", tenant="dlq", agent="bot", task=TASK, session_id="dlq-ok",
                             messages=messages(case.sentence), response=case.answer, wait=True)
        recorder.outcome("dlq-ok", tenant="dlq", source="HUMAN", success=False, correction=case.answer, wait=True)
    assert curated_by_id(kafka, module_topics, ["dlq-ok"])["dlq-ok"]["admitted"]
    dead = wait_until(kafka, module_topics.name("dead_letters"), "dead_letter", lambda rs: len(rs) >= len(corpus))
    assert len(dead) == len(corpus), [d["reason"] for _, _, d in dead]
    for _, _, letter in dead:
        n = offsets[(letter["source_topic"], letter["source_partition"], letter["source_offset"])]
        kind, _, key, value, reason = corpus[n]
        assert reason in letter["reason"], (kind, letter["reason"])
        assert letter["value"] == value and letter["key"] == key and letter["stage"] == "decode", kind
    stats = get_json(port(env), "/adaptloop/metrics")
    assert sum(stats["stages"]["decode"]["dead_lettered"].values()) == len(corpus)
    assert worker.alive(), worker.tail()


# ------------------------------------------------------------------ join: order, horizon, precedence

def test_join_order_horizon_and_precedence(kafka, module_topics, worker, env):
    cases = OrderGenerator(seed=21).cases(5)
    t = "acme"
    ids = {k: f"{k}-{uuid.uuid4().hex[:6]}" for k in ("first", "late", "prec", "human", "after")}
    outcome_ids: dict[str, list[str]] = {}

    def interaction(rec, key, case, response, **extra):
        rec.interaction(interaction_id=ids[key], tenant=t, agent="bot", task=TASK, session_id=ids[key],
                        messages=messages(case.sentence), response=response, wait=True, **extra)

    with Recorder(kafka, module_topics) as rec:
        # The outcome arrives before its interaction.
        rec.outcome(ids["first"], tenant=t, source="VALIDATOR", success=True, wait=True)
        interaction(rec, "first", cases[0], cases[0].answer)
        # The outcome comes 25 h (event time) after its interaction: past the 24 h horizon.
        interaction(rec, "late", cases[1], "no idea", event_time=stages.now_ms() - 25 * 3_600_000)
        rec.outcome(ids["late"], tenant=t, source="HUMAN", success=False, correction=cases[1].answer, wait=True)
        # Three outcomes, weakest first: the human correction wins, the others stay in the lineage.
        outcome_ids["prec"] = [rec.outcome(ids["prec"], tenant=t, source="HEURISTIC", success=True, wait=True),
                               rec.outcome(ids["prec"], tenant=t, source="VALIDATOR", success=False, wait=True),
                               rec.outcome(ids["prec"], tenant=t, source="HUMAN", success=False,
                                           correction=cases[2].answer, wait=True)]
        interaction(rec, "prec", cases[2], "Sure! A lamp.")
        # A human verdict beats a validator's, even though the validator came first.
        outcome_ids["human"] = [rec.outcome(ids["human"], tenant=t, source="VALIDATOR", success=True, wait=True)]
        interaction(rec, "human", cases[3], cases[3].answer)
        outcome_ids["human"].insert(0, rec.outcome(ids["human"], tenant=t, source="HUMAN", success=False, wait=True))
    got = curated_by_id(kafka, module_topics, [ids[k] for k in ("first", "late", "prec", "human")])

    first = got[ids["first"]]
    assert (first["kind"], first["admitted"], first["outcome_source"]) == ("SUCCESS", True, "VALIDATOR")
    late = got[ids["late"]]
    assert (late["kind"], late["admitted"]) == ("FAILURE", False)
    assert "past the 24 h horizon" in late["reject_reason"], late["reject_reason"]
    prec = got[ids["prec"]]
    assert (prec["kind"], prec["admitted"], prec["rejected"]) == ("CORRECTION", True, "Sure! A lamp.")
    assert prec["lineage"]["outcome_ids"] == list(reversed(outcome_ids["prec"]))
    assert prec["lineage"]["winning_outcome_id"] == outcome_ids["prec"][2]
    human = got[ids["human"]]
    assert (human["kind"], human["admitted"], human["outcome_source"]) == ("FAILURE", False, "HUMAN")
    assert human["lineage"]["outcome_ids"] == outcome_ids["human"]

    # An outcome after the example was curated: counted and logged, never a second example.
    with Recorder(kafka, module_topics) as rec:
        rec.outcome(ids["first"], tenant=t, source="HUMAN", success=False, correction=cases[0].answer, wait=True)
    deadline = time.monotonic() + 20
    while get_json(port(env), "/adaptloop/metrics")["stages"]["join"]["rejected"].get("after_curated", 0) < 1:
        assert time.monotonic() < deadline, "the late outcome was not counted"
        time.sleep(0.5)
    curated = read_all(kafka, module_topics.name("curated"), "curated_example")
    assert sum(r["example_id"] == ids["first"] for _, _, r in curated) == 1


# ------------------------------------------------------------------ PII

def test_pii_is_redacted_before_anything_is_stored(kafka, module_topics, worker, env):
    t, iid = "pii", f"pii-{uuid.uuid4().hex[:6]}"
    case = OrderGenerator(seed=31).case()
    user = f"{case.sentence} I am bob.pii@example.com, call +1 415-555-2671, employee EMP-004211."
    with Recorder(kafka, module_topics) as rec:
        rec.interaction(interaction_id=iid, tenant=t, agent="bot", task=TASK, session_id=iid, messages=messages(user),
                        response="my key is AKIAIOSFODNN7EXAMPLE", wait=True)
        rec.outcome(iid, tenant=t, source="HUMAN", success=False, correction=case.answer,
                    reason="customer bob.pii@example.com complained", wait=True)
    example = curated_by_id(kafka, module_topics, [iid])[iid]
    assert example["kind"] == "CORRECTION"
    assert "[EMAIL]" in example["prompt_messages"][1]["content"] and "[PHONE]" in example["prompt_messages"][1]["content"]
    assert example["rejected"] == "my key is [SECRET]"
    assert {r["rule"]: r["count"] for r in example["redactions"]} == {"email": 2, "phone": 1, "secret": 1,
                                                                       "custom:employee": 1}
    assert set(example["subjects"]) == {subject_of(env, t, "bob.pii@example.com"), subject_of(env, t, "+14155552671"),
                                        subject_of(env, t, "EMP-004211")}
    # Nowhere downstream: not in the join table's changelog, the internal topic, or the curated topic.
    app_id = env[1]["ADAPTLOOP_STREAMS_APP_ID"]
    for topic in (f"{app_id}-joins-changelog", f"{app_id}-scored", module_topics.name("curated")):
        raw = b"".join(m.value() or b"" for m in read_ranges(kafka, topic, idle_s=1.5, timeout_s=60))
        assert raw, topic
        for secret in (b"bob.pii@example.com", b"555-2671", b"EMP-004211", b"AKIAIOSFODNN7EXAMPLE"):
            assert secret not in raw, (topic, secret)
    stats = get_json(port(env), "/adaptloop/metrics")
    assert stats["tenants"]["pii/order-extract"]["redactions"]["email"] == 2


# ------------------------------------------------------------------ dedupe + leak-proof split

def test_duplicates_and_near_duplicates_of_holdout_never_reach_training(kafka, module_topics, worker, env):
    t = "dup"
    c1, c2, c3 = OrderGenerator(seed=41).cases(3)
    hold = session_with("HOLDOUT", t)
    train1 = session_with("TRAIN", t)
    train2 = session_with("TRAIN", t, {train1})
    ids = {k: f"dup-{k}-{uuid.uuid4().hex[:6]}" for k in "ABCDE"}

    def send(rec, key, session, sentence, answer):
        rec.interaction(interaction_id=ids[key], tenant=t, agent="bot", task=TASK, session_id=session,
                        messages=messages(sentence), response="?", wait=True)
        rec.outcome(ids[key], tenant=t, source="HUMAN", success=False, correction=answer, wait=True)

    with Recorder(kafka, module_topics) as rec:
        send(rec, "A", hold, c1.sentence, c1.answer)
        send(rec, "C", train1, c2.sentence, c2.answer)
    first = curated_by_id(kafka, module_topics, [ids["A"], ids["C"]])
    assert first[ids["A"]]["split"] == "HOLDOUT" and first[ids["C"]]["split"] == "TRAIN"
    with Recorder(kafka, module_topics) as rec:
        send(rec, "B", train2, c1.sentence.rstrip(".?") + "!!", c1.answer)  # near-dup of holdout A
        send(rec, "D", train2, "  " + c2.sentence.upper() + " ", c2.answer)  # exact dup of C after normalization
        send(rec, "E", train2, c3.sentence, c3.answer)
    got = curated_by_id(kafka, module_topics, list(ids.values()))
    assert got[ids["A"]]["admitted"] and got[ids["C"]]["admitted"] and got[ids["E"]]["admitted"]
    b, d = got[ids["B"]], got[ids["D"]]
    assert (b["admitted"], b["split"], b["near_duplicate_of"]) == (False, "TRAIN", ids["A"]), b["reject_reason"]
    assert b["reject_reason"] == f"near duplicate of {ids['A']}"
    assert (d["admitted"], d["near_duplicate_of"], d["reject_reason"]) == (False, ids["C"], f"exact duplicate of {ids['C']}")
    assert d["content_hash"] == got[ids["C"]]["content_hash"] != got[ids["E"]]["content_hash"]
    rejected = get_json(port(env), "/adaptloop/metrics")["tenants"]["dup/order-extract"]["rejected"]
    assert rejected == {"near_duplicate": 1, "exact_duplicate": 1}


# ------------------------------------------------------------------ windows + tenant isolation

def test_windows_by_count_and_by_age_with_tenant_isolation(kafka, module_topics, worker, env):
    cases = OrderGenerator(seed=51).cases(5)
    sent: dict[str, list[str]] = {"ta": [], "tb": []}
    with Recorder(kafka, module_topics) as rec:
        for n, case in enumerate(cases):
            t = "ta" if n < WINDOW_SIZE else "tb"  # ta: a full window by count; tb: 2 examples, fired by age
            iid = f"{t}-{n}-{uuid.uuid4().hex[:6]}"
            session = session_with("TRAIN", t, set(sent[t]))
            sent[t].append(session)
            rec.interaction(interaction_id=iid, tenant=t, agent="bot", task=TASK, session_id=session,
                            messages=messages(case.sentence), response=case.answer)
            rec.outcome(iid, tenant=t, source="HUMAN", success=True)
    started = time.monotonic()
    requests = wait_until(kafka, module_topics.name("training_requests"), "training_request",
                          lambda rs: {"ta", "tb"} <= {r["tenant"] for _, _, r in rs})
    time.sleep(MAX_AGE_S + 1)  # room for a wrong second request
    requests = [r for _, _, r in read_all(kafka, module_topics.name("training_requests"), "training_request")
                if r["tenant"] in ("ta", "tb")]
    by_tenant = {t: [r for r in requests if r["tenant"] == t] for t in ("ta", "tb")}
    assert [len({r["request_id"] for r in rs}) for rs in by_tenant.values()] == [1, 1], requests
    ta, tb = by_tenant["ta"][0], by_tenant["tb"][0]
    assert (ta["trigger"], ta["train_count"]) == (f"count>={WINDOW_SIZE}", WINDOW_SIZE)
    assert (tb["trigger"], tb["train_count"]) == (f"age>={MAX_AGE_S}s", 2)
    assert time.monotonic() - started >= 0  # (age is measured by the worker from the first tb example)
    for request in (ta, tb):
        dataset = dataset_of(kafka, request)
        assert {e["tenant"] for e in dataset.values()} == {request["tenant"]}
        assert {e["session_id"] for e in dataset.values()} == set(sent[request["tenant"]])
        assert sum(e["split"] == "TRAIN" for e in dataset.values()) == request["train_count"]
        assert request["request_id"] == windows.request_id(request["tenant"], TASK, request["examples"])


# ------------------------------------------------------------------ erasures

def test_erased_interactions_sessions_and_subjects_are_never_curated(kafka, module_topics, worker, env):
    t = "er"
    ids = {k: f"er-{k}-{uuid.uuid4().hex[:6]}" for k in ("id", "subject", "session", "kept")}
    erasures = DeliveryTracker(kafka)
    serialize = serde_for("erasure").serialize
    for scope, key in (("INTERACTION", ids["id"]), ("SUBJECT", subject_of(env, t, "carol@example.com")),
                       ("SESSION", "er-forgotten-session")):
        erasures.send(module_topics.name("erasures"), serialize(build_erasure(tenant=t, scope=scope, key=key),
                                                          SerdeContext(module_topics.name("erasures"))), key=t)
    erasures.flush()
    time.sleep(2)  # the worker's tick follows the erasures topic
    cases = OrderGenerator(seed=61).cases(4)
    with Recorder(kafka, module_topics) as rec:
        for (k, iid), case in zip(ids.items(), cases):
            user = case.sentence + (" Reply to carol@example.com." if k == "subject" else "")
            session = "er-forgotten-session" if k == "session" else iid
            rec.interaction(interaction_id=iid, tenant=t, agent="bot", task=TASK, session_id=session,
                            messages=messages(user), response="?", wait=True)
            rec.outcome(iid, tenant=t, source="HUMAN", success=False, correction=case.answer, wait=True)
    curated_by_id(kafka, module_topics, [ids["kept"]])
    time.sleep(2)
    curated = {r["example_id"] for _, _, r in read_all(kafka, module_topics.name("curated"), "curated_example")}
    assert ids["kept"] in curated and not {ids["id"], ids["subject"], ids["session"]} & curated
    stats = get_json(port(env), "/adaptloop/metrics")
    assert stats["tenants"]["er/order-extract"]["erased"] >= 3
    assert not stats["tenants"]["er/order-extract"]["dead_lettered"]  # erased is not dead-lettered


def test_validators_configured_per_task(kafka, module_topics, worker):
    cases = [("intent", "refund", True, None), ("intent", "I want a refund", False, "does not match"),
             ("ticket", '{"id": 3}', True, None), ("ticket", '{"id": "x"}', False, "schema: 'x' is not of type 'integer'")]
    ids = []
    with Recorder(kafka, module_topics) as rec:
        for n, (task, response, _, _) in enumerate(cases):
            iid = f"val-{n}-{uuid.uuid4().hex[:6]}"
            ids.append(iid)
            rec.interaction(interaction_id=iid, tenant="val", agent="bot", task=task, session_id=iid,
                            messages=[{"role": "user", "content": f"case {n}"}], response=response)
            rec.outcome(iid, tenant="val", source="VALIDATOR", success=True)
    got = curated_by_id(kafka, module_topics, ids)
    for iid, (task, _, ok, reason) in zip(ids, cases):
        example = got[iid]
        assert (example["task"], example["admitted"]) == (task, ok), example["reject_reason"]
        assert example["scorer"].startswith(f"{TASKS[task]}:{task}@1#")
        if reason:
            assert reason in example["reject_reason"], example["reject_reason"]


def test_an_episode_outcome_credits_the_trajectory_and_a_turn_correction_its_turn(kafka, module_topics, worker):
    tenant, episode = "ep", f"run-{uuid.uuid4().hex[:8]}"
    tools = json.dumps([{"type": "function", "function": {"name": "lookup_order", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string"}}}}}])
    user = {"role": "user", "content": "Where is order A1?"}
    call = {"id": "c1", "name": "lookup_order", "arguments": '{"order_id": "A1"}'}
    better = {"id": "c1", "name": "lookup_order", "arguments": '{"order_id": "A1", "with_eta": true}'}
    history = [user, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": '{"status": "shipped"}'}]
    with Recorder(kafka, module_topics) as rec:
        turn = dict(tenant=tenant, agent="bot", task="support", session_id=episode, episode_id=episode, tools_json=tools)
        first = rec.interaction(**turn, messages=[user], response="", tool_calls=[call])
        # The episode's outcome comes before its last call (they travel separately): it still credits the last.
        rec.outcome("", tenant=tenant, episode_id=episode, source="BUSINESS", success=True, reason="resolved")
        second = rec.interaction(**turn, messages=history, response="It shipped on Monday.", episode_end=True)
        rec.outcome(first, tenant=tenant, source="HUMAN", success=False, correction_tool_calls=[better])
    assert first.split(".")[0] == second.split(".")[0]  # one partition key for the whole episode
    got = curated_by_id(kafka, module_topics, [first, second + "#episode"])
    whole, corrected = got[second + "#episode"], got[first]
    assert (whole["scope"], whole["kind"], whole["admitted"], whole["turn"]) == ("EPISODE", "SUCCESS", True, 2)
    assert whole["episode_id"] == episode and whole["completion"] == "It shipped on Monday."
    assert [m["role"] for m in whole["prompt_messages"]] == ["user", "assistant", "tool"]
    assert whole["prompt_messages"][1]["tool_calls"] == [call] and whole["prompt_messages"][2]["tool_call_id"] == "c1"
    assert json.loads(whole["tools_json"]) == json.loads(tools)
    assert (corrected["scope"], corrected["kind"], corrected["turn"]) == ("CALL", "CORRECTION", 1)
    assert corrected["completion_tool_calls"] == [better] and corrected["rejected_tool_calls"] == [call]
    assert whole["split"] == corrected["split"]  # an episode is never split between train and holdout


def test_metrics_as_prometheus_text_and_json(env, worker):
    text = get_text(port(env), "/metrics")
    assert 'adaptloop_streams_records_total{reason="",result="admitted",stage="window",tenant_task="ta/order-extract"}' in text
    assert "adaptloop_streams_redactions_total" in text and "adaptloop_streams_consumer_lag" in text
    stats = get_json(port(env), "/adaptloop/metrics")
    assert set(stats) == {"stages", "tenants", "consumer_lag", "state"}
    assert stats["tenants"]["ta/order-extract"]["admitted"] >= WINDOW_SIZE
    assert all(isinstance(v, int) and v >= 0 for v in stats["consumer_lag"].values()) and stats["consumer_lag"]


def test_state_stays_bounded_and_an_erasure_empties_pending_entries(kafka, topics, tmp_path):
    """A worker of its own with a 10 s outcome horizon: an interaction that never gets an outcome, an outcome
    whose interaction never comes and a curated pair all leave the join table one horizon later (the orphan
    counted), and an erasure turns a pending interaction's entry into the marker at once (its changelog's
    newest record holds no content)."""
    environment = worker_env(kafka, topics, tmp_path, outcome_horizon_s="10", state_sweep_s="1")
    app_id = environment["ADAPTLOOP_STREAMS_APP_ID"]
    worker = start_service("streams", tmp_path, environment, timeout_s=READY_TIMEOUT_S)
    try:
        ids = {k: f"bound-{k}-{uuid.uuid4().hex[:6]}" for k in ("waiting", "erased", "pair", "orphan")}
        case = OrderGenerator(seed=71).cases(1)[0]
        with Recorder(kafka, topics) as rec:
            for k in ("waiting", "erased", "pair"):
                rec.interaction(interaction_id=ids[k], tenant="acme", agent="bot", task=TASK, session_id=ids[k],
                                messages=messages(f"{case.sentence} ({k}: write to dora@example.com)"),
                                response="?", wait=True)
            rec.outcome(ids["pair"], tenant="acme", source="HUMAN", success=False, correction=case.answer, wait=True)
            rec.outcome(ids["orphan"], tenant="acme", source="VALIDATOR", success=True, wait=True)
        curated_by_id(kafka, topics, [ids["pair"]])
        erasures = DeliveryTracker(kafka)
        erasures.send(topics.name("erasures"), serde_for("erasure").serialize(
            build_erasure(tenant="acme", scope="SESSION", key=ids["erased"]), SerdeContext(topics.name("erasures"))),
            key="acme")
        erasures.flush()

        changelog = f"{app_id}-joins-changelog"

        def newest(key: str) -> dict | None:
            values = [m.value() for m in read_ranges(kafka, changelog, idle_s=0.5) if m.key() == json.dumps(key).encode()]
            return json.loads(values[-1]) if values and values[-1] is not None else None

        deadline = time.monotonic() + 8
        while (newest(ids["erased"]) or {}).get("emitted") != "ERASED" and time.monotonic() < deadline:
            time.sleep(0.3)
        marker = newest(ids["erased"])
        assert marker["emitted"] == "ERASED" and "interaction" not in marker and "dora" not in json.dumps(marker)
        assert "interaction" in newest(ids["waiting"])  # the erasure took only its own

        deadline = time.monotonic() + 40
        while True:
            stats = get_json(environment["ADAPTLOOP_STREAMS_WEB_PORT"], "/adaptloop/metrics")
            if not stats["state"]["entries"]["joins"] or time.monotonic() > deadline:
                break
            time.sleep(1)
        print(json.dumps(stats["state"]), stats["stages"]["join"]["rejected"])
        assert stats["state"]["entries"]["joins"] == 0 and stats["state"]["evicted"]["joins"] == 4
        assert stats["stages"]["join"]["rejected"].get("orphan_outcome") == 1
        assert all(newest(key) is None for key in ids.values())  # tombstones in the changelog
    finally:
        worker.stop()
