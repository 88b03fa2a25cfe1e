"""The trainer service against a real Tansu broker, real Ray and the real base model (no mocks).

    HF_HUB_OFFLINE=1 python -m pytest tests/integration/test_trainer.py -m integration -v -s

One broker, one set of topics and one in-process Ray for the module; tenants keep the tests apart.
Prints each release's holdout success (base or incumbent -> candidate) and the training time.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from adaptloop.artifacts import base_model_digest, verify_digest
from adaptloop.demo_tasks import OrderGenerator
from adaptloop.kafka import DeliveryTracker, consumer_config, producer_config, read_ranges
from adaptloop.records import read_decoded
from adaptloop.schemas import SerdeContext, serde_for
from adaptloop.settings import DEFAULT_HOME, ModelSettings, Topics, TrainerSettings
from adaptloop.tasks import example_catalogue, parse_catalogue

pytestmark = pytest.mark.integration

TASK = "order-extract"
CITY_TASK = "order-city"
CITY_PROMPT = 'Answer with JSON only: {"city": <the delivery city>}.'
SUPPORT_TASK = "support-agent"
VERDICT = "outcome is not a success and carries no correction"

#: The trainer's catalogue: the example's order task, and task B of the regression test ({"city": ...}).
CATALOGUE = parse_catalogue(f"""
tasks:
  {TASK}:
    system_prompt: {json.dumps(example_catalogue().get(TASK).system_prompt)}
    validator: {{kind: python, function: "adaptloop.demo_tasks:order_json"}}
  {CITY_TASK}:
    system_prompt: {json.dumps(CITY_PROMPT)}
    validator:
      kind: json_schema
      schema: {{type: object, required: [city], additionalProperties: false, properties: {{city: {{type: string}}}}}}
  {SUPPORT_TASK}:
    system_prompt: {json.dumps(example_catalogue().get(SUPPORT_TASK).system_prompt)}
    validator: {{kind: python, function: "adaptloop.support_task:support_turn"}}
    tools: adaptloop.support_task:TOOLS
    episode_judge: adaptloop.support_task:judge_episode
    environment: adaptloop.support_task:replay_world
    max_new_tokens: 64
""", "test_trainer.CATALOGUE")


#: Nothing else computes while these tests train (no vLLM, no curation load), so both cores train: LoRA steps
#: ~1.5x faster than with the stack's default of 1 thread, which is for cores shared with vLLM.
TORCH_THREADS = 2
MAX_NEW_TOKENS = 48

TASKS = CATALOGUE.tasks


def prose(case) -> str:
    """What the base model tends to answer instead of JSON: the wrong answer in KTO/DPO data."""
    return f"{case.truth['customer']} ordered {case.truth['quantity']} {case.truth['product']} for {case.truth['city']}."


_made: Counter = Counter()


def curated(case, split: str, *, tenant: str, kind: str = "SUCCESS", task: str = TASK, completion: str | None = None,
            rejected: str | None = None, admitted: bool = True, reject_reason: str | None = None) -> dict:
    """A CuratedExample (schemas/avro/curated_example.v2.avsc). Its ids follow from its content (and how
    many alike were made before): the snapshot orders training data by example id, so random ids
    would train each run on another order, and a small run's result depends on it."""
    system = TASKS[task].system_prompt
    name = f"{tenant}/{task}/{split}/{kind}/{case.sentence}/{completion}/{rejected}"
    _made[name] += 1
    digest = uuid.uuid5(uuid.NAMESPACE_URL, f"{name}#{_made[name]}").hex
    return {
        "example_id": f"ex-{digest[:12]}", "tenant": tenant, "task": task, "session_id": f"s-{digest[12:18]}",
        "split": split, "kind": kind, "admitted": admitted, "reject_reason": reject_reason,
        "prompt_messages": [{"role": "system", "content": system}, {"role": "user", "content": case.sentence}],
        "completion": case.answer if completion is None else completion, "rejected": rejected, "score": 1.0,
        "scorer": TASKS[task].scorer, "curated_at": int(time.time() * 1000),
        "lineage": {"interaction": {"topic": "agent.interactions", "partition": 0, "offset": 0},
                    "outcomes": [], "outcome_ids": [], "code_version": "test"},
    }


def produce_curated(kafka, topic: str, records: list[dict]) -> list[dict]:
    """Produce ``records`` keyed by example id; return the [start, end) ranges they landed in."""
    serde = serde_for("curated_example")
    producer = Producer(producer_config(kafka))
    offsets: dict[int, list[int]] = {}
    errors: list[str] = []

    def delivered(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            offsets.setdefault(msg.partition(), []).append(msg.offset())

    for record in records:
        producer.produce(topic, serde.serialize(record, SerdeContext(topic)), key=record["example_id"], on_delivery=delivered)
    assert producer.flush(30) == 0 and not errors, errors
    return [{"topic": topic, "partition": p, "start_offset": min(o), "end_offset": max(o) + 1}
            for p, o in sorted(offsets.items())]


def training_request(tenant: str, ranges: list[dict], task: str = TASK) -> dict:
    return {"request_id": f"req-{uuid.uuid4().hex}", "tenant": tenant, "task": task,
            "created_at": int(time.time() * 1000), "trigger": "test", "examples": ranges, "train_count": 0,
            "holdout_count": 0, "code_version": "test"}


def releases_on(kafka, topics) -> list[dict]:
    return [p.record for p in read_decoded(kafka, topics.name("releases"), "adapter_release", idle_s=1.0, timeout_s=60)]


def of_request(kafka, topics, request: dict) -> list[dict]:
    return [r for r in releases_on(kafka, topics) if r["lineage"]["request_id"] == request["request_id"]]


def summary(release: dict) -> str:
    e = release["evaluation"]
    training = json.loads(release["training_json"])
    test = json.loads(release["evidence_json"]).get("test") or {}
    paired = (f"; {json.loads(release['evidence_json'])['verdict']}: b={test['b']} c={test['c']} n={test['n']} "
              f"p_better={test['p_better']:.4g} alpha={test['alpha']:.3g} share={release.get('canary_share')}"
              if test else "")
    return (f"{release['method']} {release['state']}: holdout n={e['holdout_count']} {e['incumbent']} "
            f"{e['incumbent_score']:.3f} -> candidate {e['candidate_score']:.3f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]"
            f"{paired}; {training.get('steps')} steps in {training.get('train_seconds', 0):.0f}s, "
            f"{training.get('tokens_per_s', 0):.0f} tokens/s")


def assert_gate(release: dict, settings: TrainerSettings, verdict: str) -> dict:
    """The paired gate's verdict and evidence on ``release``: the test, its counts and p-value, the share given."""
    evidence = json.loads(release["evidence_json"])
    test, e = evidence["test"], release["evaluation"]
    assert evidence["verdict"] == verdict, release["reason"]
    assert test["name"] == "exact sign test on discordant pairs" and test["n"] == test["b"] + test["c"]
    assert test["holdout"] == e["holdout_count"] and test["alpha"] == pytest.approx(1 - settings.gate_confidence)
    # The pairs account for the scores: the gain is (b - c) / holdout.
    assert e["candidate_score"] - e["incumbent_score"] == pytest.approx((test["b"] - test["c"]) / test["holdout"])
    if verdict == "better":
        assert release["state"] == "RELEASED" and test["p_better"] <= test["alpha"] and release["canary_share"] is None
    elif verdict == "undecided":
        assert release["state"] == "RELEASED" and test["p_better"] > test["alpha"] and test["b"] >= test["c"]
        assert 0 < release["canary_share"] == evidence["canary_share"] < settings.canary_share
        assert "undecided" in release["reason"] and "-> canary at share" in release["reason"]
    else:
        assert release["state"] == "REJECTED" and release["canary_share"] is None
    return test


@pytest.fixture(scope="module")
def settings(kafka, module_topics, tmp_path_factory) -> TrainerSettings:
    # Order answers are at most 45 tokens (6000 generated cases): 48 new tokens judge them whole, end token
    # included, and cut the base model's rambling short (its answers run to the limit).
    yield TrainerSettings(kafka=kafka, topics=module_topics, artifact_dir=tmp_path_factory.mktemp("artifacts"),
                          group_id=f"trainer-{uuid.uuid4().hex[:8]}", max_new_tokens=MAX_NEW_TOKENS,
                          torch_threads=TORCH_THREADS, regression_scope="tenant")  # task B's test needs task A's suite
    from adaptloop.trainers.ray_job import stop_ray

    stop_ray()


@pytest.fixture(scope="module")
def service(settings):
    from adaptloop.trainers.service import TrainerService

    return TrainerService(settings, catalogue=CATALOGUE)


def test_sft_release_replay_worse_candidate_and_regression_suite(kafka, module_topics, settings, service):
    topics, tenant = module_topics, "acme"
    cases = OrderGenerator(seed=11).cases(48 + 16)
    records = [curated(c, "TRAIN" if i < 48 else "HOLDOUT", tenant=tenant) for i, c in enumerate(cases)]
    # Noise the snapshot must drop: another tenant, a contract-problem FAILURE; and an earlier record of an
    # example that curation re-emitted (the later record wins).
    records.append(curated(cases[0], "TRAIN", tenant="other"))
    records.append(curated(cases[1], "TRAIN", tenant=tenant, kind="FAILURE", admitted=False,
                           reject_reason="correction rejected by order_json@1: not JSON"))
    records.insert(0, records[2] | {"completion": "stale"})
    request = training_request(tenant, produce_curated(kafka, topics.name("curated"), records))

    started = time.monotonic()
    release = service.process(request)
    print(f"\n[sft] {summary(release)}; request handled in {time.monotonic() - started:.0f}s")
    assert release["state"] == "RELEASED", release["reason"]
    evaluation = release["evaluation"]
    assert release["method"] == "sft" and evaluation["incumbent"] == "base" and evaluation["holdout_count"] == 16
    assert evaluation["candidate_score"] > evaluation["incumbent_score"]
    assert evaluation["ci_low"] <= evaluation["candidate_score"] <= evaluation["ci_high"]
    verify_digest(release["artifact_uri"], release["digest"])
    assert release["version"].startswith(f"{tenant}--{TASK}--")
    assert release["decided_by"] == "gate" and release["regression"] == []
    assert release["base_model_digest"] == base_model_digest(service.base_model)
    lineage = release["lineage"]
    assert lineage["request_id"] == request["request_id"] and lineage["examples"] == request["examples"]
    assert len(lineage["train_example_ids"]) == 48 and lineage["parent_version"] is None
    manifest = json.loads((Path(lineage["dataset_uri"]) / "manifest.json").read_text())
    assert manifest["digest"] == lineage["dataset_digest"] and manifest["counts"]["train"] == {"SUCCESS": 48}
    assert manifest["dropped"]["superseded"] == 1 and manifest["dropped"]["no_signal"] == 1
    training = json.loads(release["training_json"])
    assert training["steps"] == 12 and len(training["loss_curve"]) >= 4 and training["tokens_per_s"] > 0
    assert json.loads(release["evidence_json"])["beats_incumbent"] is True
    assert_gate(release, settings, "better")

    # A replay (a crash before the commit) trains nothing, publishes nothing, and answers the same release.
    started = time.monotonic()
    assert service.process(request) == release
    assert time.monotonic() - started < 30
    assert [r["version"] for r in of_request(kafka, topics, request)] == [release["version"]]
    # Another request naming the same records gets the same snapshot.
    again = service.snapshot(request | {"request_id": "req-again"}, service.erasures())
    assert again.digest == lineage["dataset_digest"] and again.uri == lineage["dataset_uri"]
    # After `forget` erases one of its examples, the retraining request's snapshot leaves it out.
    from adaptloop.erasure import build_erasure

    erased_id = lineage["train_example_ids"][5]
    erasure = build_erasure(tenant=tenant, scope="INTERACTION", key=erased_id, reason="test")
    erasures_topic = topics.name("erasures")
    DeliveryTracker(kafka).send_sync(erasures_topic, serde_for("erasure").serialize(erasure, SerdeContext(erasures_topic)),
                                     key=erased_id)
    forgotten = service.snapshot(request | {"request_id": "req-after-forget"}, service.erasures())
    assert forgotten.digest != lineage["dataset_digest"] and erased_id not in forgotten.train_ids
    assert len(forgotten.train) == 47
    assert forgotten.manifest["erasures"] == {"excluded": 1, "erasure_ids": [erasure["erasure_id"]]}

    # A worse candidate: 8 examples whose answers belong to other sentences; the incumbent is now the adapter.
    wrong = OrderGenerator(seed=12).cases(8 + 12)
    worse_records = [curated(c, "TRAIN", tenant=tenant, completion=wrong[(i + 1) % 8].answer) for i, c in enumerate(wrong[:8])]
    worse_records += [curated(c, "HOLDOUT", tenant=tenant) for c in wrong[8:]]
    worse_request = training_request(tenant, produce_curated(kafka, topics.name("curated"), worse_records))
    worse = service.process(worse_request)
    evidence = json.loads(worse["evidence_json"])
    print(f"[worse] {summary(worse)}; regression {[(r['task'], r['candidate_score'], r['passed']) for r in worse['regression']]}")
    assert worse["state"] == "REJECTED" and worse["artifact_uri"] and worse["lineage"]["parent_version"] == release["version"]
    assert worse["evaluation"]["incumbent"] == release["version"]
    assert worse["evaluation"]["candidate_score"] < worse["evaluation"]["incumbent_score"]
    assert evidence["beats_incumbent"] is False and evidence["incumbent"]["name"] == release["version"]
    test = assert_gate(worse, settings, "worse")
    assert test["c"] > test["b"] and "worse on the pairs that differ" in worse["reason"]

    # Task B only: an adapter that learned to answer {"city"} beats the base on B, but the regression suite
    # (the holdout of the tenant's task-A release) catches that it answers task A that way too.
    city_cases = OrderGenerator(seed=13).cases(32 + 12)
    city_records = [curated(c, "TRAIN" if i < 32 else "HOLDOUT", tenant=tenant, task=CITY_TASK,
                            completion=json.dumps({"city": c.truth["city"]})) for i, c in enumerate(city_cases)]
    city_request = training_request(tenant, produce_curated(kafka, topics.name("curated"), city_records), task=CITY_TASK)
    city = service.process(city_request)
    print(f"[task B] {summary(city)}; regression {[(r['task'], r['candidate_score'], r['incumbent_score'], r['passed']) for r in city['regression']]}")
    assert city["evaluation"]["candidate_score"] >= city["evaluation"]["incumbent_score"] + settings.gate_margin
    assert city["state"] == "REJECTED" and "regression" in city["reason"]
    suite = {r["source_version"]: r for r in city["regression"]}
    assert suite[release["version"]]["task"] == TASK and not suite[release["version"]]["passed"]


def test_kto_from_verdicts_only(kafka, module_topics, settings, service):
    tenant = "kto-co"
    cases = OrderGenerator(seed=21).cases(32 + 12)
    records = [curated(c, "TRAIN", tenant=tenant) for c in cases[:16]]
    records += [curated(c, "TRAIN", tenant=tenant, kind="FAILURE", admitted=False, reject_reason=VERDICT,
                        completion=prose(c)) for c in cases[16:32]]
    records += [curated(c, "HOLDOUT", tenant=tenant) for c in cases[32:]]
    release = service.process(training_request(tenant, produce_curated(kafka, module_topics.name("curated"), records)))
    print(f"\n[kto] {summary(release)}")
    training = json.loads(release["training_json"])
    assert release["method"] == "kto" and training["signal"] == {"desirable": 16, "undesirable": 16, "pairs": 0}
    assert release["state"] == "RELEASED", release["reason"]
    assert release["evaluation"]["candidate_score"] > release["evaluation"]["incumbent_score"]
    assert_gate(release, settings, "better")


def test_dpo_from_correction_pairs(kafka, module_topics, settings, service):
    tenant = "dpo-co"
    cases = OrderGenerator(seed=31).cases(24 + 12)
    records = [curated(c, "TRAIN", tenant=tenant, kind="CORRECTION", rejected=prose(c)) for c in cases[:24]]
    records += [curated(c, "HOLDOUT", tenant=tenant) for c in cases[24:]]
    release = service.process(training_request(tenant, produce_curated(kafka, module_topics.name("curated"), records)))
    print(f"\n[dpo] {summary(release)}")
    assert release["method"] == "dpo" and json.loads(release["training_json"])["signal"]["pairs"] == 24
    assert release["state"] == "RELEASED", release["reason"]
    assert release["evaluation"]["candidate_score"] > release["evaluation"]["incumbent_score"]
    assert_gate(release, settings, "better")


def curated_turn(example: dict, split: str, *, tenant: str, episode: str, rejected: dict | None = None) -> dict:
    """A CuratedExample of one support-agent turn (its trajectory, tools and right turn); with ``rejected`` (the
    turn the agent took instead: {"content", "tool_calls"}) a reviewer's correction of it."""
    from adaptloop.sdk import message_record, tool_call_record

    record = curated(OrderGenerator(0).cases(1)[0], split, tenant=tenant, task=SUPPORT_TASK,
                     kind="CORRECTION" if rejected else "SUCCESS", completion=example["completion"])
    system = [{"role": "system", "content": TASKS[SUPPORT_TASK].system_prompt}]
    name = f"{tenant}/{episode}/{example['turn']}"
    return record | {
        "example_id": f"ex-{uuid.uuid5(uuid.NAMESPACE_URL, name).hex[:12]}",
        "session_id": episode, "episode_id": episode, "turn": example["turn"], "tools_json": example["tools_json"],
        "prompt_messages": [message_record(m) for m in system + example["prompt_messages"]],
        "completion_tool_calls": [tool_call_record(c) for c in example["completion_tool_calls"]],
        "rejected": (rejected or {}).get("content"),
        "rejected_tool_calls": [tool_call_record(c) for c in (rejected or {}).get("tool_calls", [])]}


def test_dpo_on_corrected_tool_turns_gated_on_replayed_episodes(kafka, module_topics, settings, service):
    """A reviewer corrected tool turns (the right call where the agent picked another tool, the right answer
    where it called one): DPO trains at those turns, on the prompt vLLM renders with the tools, and the gate
    replays held-out episodes of another world with candidate and base as the agent in the task's environment."""
    from adaptloop.ops.tool_offline import trajectories

    tenant = "dpo-tools"
    wrong_tool = {"lookup_order": "handoff_to_person", "refund": "change_address", "change_address": "refund",
                  "handoff_to_person": "lookup_order"}
    records = []
    for example in trajectories(4, seed=7)[:8]:  # the trainer's fewest examples
        calls = example["completion_tool_calls"]
        rejected = ({"tool_calls": [dict(calls[0], name=wrong_tool[calls[0]["name"]])]} if calls else
                    {"content": "", "tool_calls": [{"id": "c", "name": "lookup_order",
                                                    "arguments": json.dumps({"order_id": "A10000"})}]})
        records.append(curated_turn(example, "TRAIN", tenant=tenant, episode=example["episode_id"], rejected=rejected))
    records += [curated_turn(example, "HOLDOUT", tenant=tenant, episode=example["episode_id"])
                for example in trajectories(2, seed=99, held_out=True)]
    release = service.process(training_request(tenant, produce_curated(kafka, module_topics.name("curated"), records),
                                               task=SUPPORT_TASK))
    print(f"\n[dpo on tool turns] {summary(release)}: {release['reason'][:300]}")
    training = json.loads(release["training_json"])
    assert release["method"] == "dpo" and training["signal"]["pairs"] == 8 and training["steps"] > 0, release["reason"]
    evaluation = release["evaluation"]
    assert evaluation["metric"].startswith(f"episode_success:python:{SUPPORT_TASK}@") and evaluation["holdout_count"] == 2
    # Two held-out episodes cannot show a candidate better at 95% (2 of 2 gives p = 1/4): the gate says it cannot
    # decide, and the release goes to the canary at a share of its own, set by that uncertainty, for production
    # outcomes to decide.
    test = assert_gate(release, settings, "undecided")
    assert test["unit"] == "episode" and test["holdout"] == 2
    assert release["canary_share"] == pytest.approx(settings.canary_share * max(0.1, 1 - test["p_better"]), abs=1e-4)


def test_evaluations_side_by_side_answer_as_they_do_one_at_a_time():
    from adaptloop.model import ensure_base_model
    from adaptloop.trainers import evaluate as ev

    model = ensure_base_model(DEFAULT_HOME)
    jobs = [ev.EvalJob(TASKS[TASK], [{"prompt_messages": [{"role": "user", "content": c.sentence}], "completion": c.answer}
                                     for c in OrderGenerator(seed=seed).cases(3)], name=f"seed {seed}")
            for seed in (41, 42, 43)]
    alone = ev.evaluate_many(model, jobs, max_new_tokens=12, threads=1)  # one after the other
    side_by_side = ev.evaluate_many(model, jobs, max_new_tokens=12, threads=TORCH_THREADS)
    assert [r.name for r in side_by_side] == [job.name for job in jobs]
    assert [(r.passed, r.mean_score, r.failures) for r in side_by_side] == [(r.passed, r.mean_score, r.failures) for r in alone]
    # Item by item, in holdout order: what the gate pairs up.
    assert [(r.verdicts, r.items) for r in side_by_side] == [(r.verdicts, r.items) for r in alone]
    assert all(len(r.verdicts) == r.count == 3 and sum(r.verdicts) == r.passed for r in alone)
    assert alone[0].items == ("#0", "#1", "#2")  # these holdout rows have no example ids: their positions
    assert len({json.dumps(r.failures) for r in alone}) == 3  # three different holdouts: a mix-up would show


def test_the_candidate_held_by_its_actor_answers_as_the_saved_adapter_does(settings, tmp_path):
    """The gate evaluates the candidate on the actor that trained it, without loading it again: its answers are
    the released adapter's, loaded from its folder as a server or a later evaluation would."""
    from adaptloop.model import ensure_base_model
    from adaptloop.trainers import evaluate as ev
    from adaptloop.trainers import ray_job
    from adaptloop.trainers.sft import SFTRecipeConfig

    model = ensure_base_model(DEFAULT_HOME)
    cfg = SFTRecipeConfig.from_mapping({"model_path": str(model), "output_dir": str(tmp_path / "adapter"),
                                        "work_dir": str(tmp_path / "checkpoints"), "task": TASK,
                                        "generate_examples": 8, "generate_seed": 5, "epochs": 1, "batch_size": 4,
                                        "threads": TORCH_THREADS, "save_steps": 0, "seed": 1234})
    prompts = [[{"role": "system", "content": TASKS[TASK].system_prompt}, {"role": "user", "content": c.sentence}]
               for c in OrderGenerator(seed=77).cases(5)]
    ray_job.start_ray(settings)
    with ray_job.training_run(settings, f"req-held-{uuid.uuid4().hex[:8]}") as run:
        result = run.train("sft", cfg, hold=True)
        held = run.completer(MAX_NEW_TOKENS)(prompts)
    saved = ev.completer(model, adapter_dir=result.adapter_dir, max_new_tokens=MAX_NEW_TOKENS, threads=TORCH_THREADS)
    assert held == saved(prompts)
    base = ev.completer(model, max_new_tokens=MAX_NEW_TOKENS, threads=TORCH_THREADS)(prompts)
    assert held != base  # trained: the comparison could tell the candidate from the base
    print(f"\nheld candidate == saved adapter on {len(prompts)} prompts, e.g. {held[0]!r} (base: {base[0]!r})")


def test_killed_trainer_resumes_from_its_checkpoint_and_a_replay_gives_the_same_release(
        kafka, module_topics, settings, service, tmp_path):
    from adaptloop.model import ensure_base_model
    from adaptloop.processes import ManagedProcess, adaptloop_command
    from adaptloop.ops.stack import service_env

    tenant = "resume-co"
    cases = OrderGenerator(seed=41).cases(24 + 8)
    records = [curated(c, "TRAIN" if i < 24 else "HOLDOUT", tenant=tenant) for i, c in enumerate(cases)]
    request = training_request(tenant, produce_curated(kafka, module_topics.name("curated"), records))
    requests_topic = module_topics.name("training_requests")
    DeliveryTracker(kafka).send_sync(requests_topic, serde_for("training_request").serialize(request, SerdeContext(requests_topic)),
                                     key=request["request_id"])
    artifacts = tmp_path / "artifacts"
    group = f"trainer-{uuid.uuid4().hex[:8]}"
    env = service_env(kafka, module_topics, tmp_path) | {
        "ADAPTLOOP_TRAINER_ARTIFACT_DIR": str(artifacts), "ADAPTLOOP_TRAINER_GROUP_ID": group,
        "ADAPTLOOP_TRAINER_CHECKPOINT_STEPS": "2", "ADAPTLOOP_TRAINER_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
        "ADAPTLOOP_TRAINER_TORCH_THREADS": str(TORCH_THREADS),
        "ADAPTLOOP_MODEL_PATH": str(ensure_base_model(DEFAULT_HOME))}
    checkpoints = artifacts / request["request_id"] / "checkpoints"

    first = ManagedProcess("trainer-1", adaptloop_command("trainer"), tmp_path / "trainer-1.log", env=env).start()
    try:
        first.wait_ready(lambda: any(checkpoints.glob("checkpoint-*/trainer_state.json")), timeout_s=400, poll_s=0.5)
        time.sleep(1.0)  # let the checkpoint's last file land
        first.kill()  # SIGKILL of the whole process group, Ray included, mid-job
    finally:
        first.stop()
    killed_at = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    print(f"\n[resume] killed with checkpoints at steps {killed_at}")
    assert killed_at and of_request(kafka, module_topics, request) == []

    second = ManagedProcess("trainer-2", adaptloop_command("trainer", "--max-requests", "1"),
                            tmp_path / "trainer-2.log", env=env).start()
    try:
        deadline = time.monotonic() + 500
        while second.alive() and time.monotonic() < deadline:
            time.sleep(1)
        assert not second.alive(), "the restarted trainer did not finish the request in time"
    finally:
        second.stop()
    log = (tmp_path / "trainer-2.log").read_text()
    published = of_request(kafka, module_topics, request)
    assert len(published) == 1, second.tail()
    release = published[0]
    training = json.loads(release["training_json"])
    print(f"[resume] {summary(release)}; resumed from step {training['resumed_from_step']}")
    assert training["resumed_from_step"] >= min(killed_at) and training["steps"] == 6
    assert "resuming from" in log
    assert release["state"] in ("RELEASED", "REJECTED") and release["artifact_uri"]

    # The same request again (a replay): no training, the same release.
    started = time.monotonic()
    assert service.process(request) == release
    assert time.monotonic() - started < 30 and len(of_request(kafka, module_topics, request)) == 1


def test_bad_input_is_rejected_on_record_and_the_service_goes_on(kafka, module_topics, settings, service, tmp_path):
    from adaptloop.trainers.service import TrainerService
    from adaptloop.trainers.service_loop import run

    topics, tenant = module_topics, "bad-co"
    curated_topic, requests_topic = topics.name("curated"), topics.name("training_requests")
    cases = OrderGenerator(seed=51).cases(12)
    few = produce_curated(kafka, curated_topic, [curated(c, "TRAIN", tenant=tenant) for c in cases[:4]]
                          + [curated(cases[4], "HOLDOUT", tenant=tenant)])
    one_class = produce_curated(kafka, curated_topic, [
        curated(c, "TRAIN", tenant=tenant, kind="FAILURE", admitted=False, reject_reason=VERDICT, completion=prose(c))
        for c in cases[:10]] + [curated(cases[10], "HOLDOUT", tenant=tenant)])
    requests = {
        "empty": training_request(tenant, [{"topic": curated_topic, "partition": 0, "start_offset": 0, "end_offset": 0}]),
        "below minimum": training_request(tenant, few),
        "single-class KTO": training_request(tenant, one_class),
    }
    # A fresh group on a fresh requests topic view: garbage first, then the three requests.
    group_settings = settings.model_copy(update={"group_id": f"trainer-{uuid.uuid4().hex[:8]}"})
    start = sum(1 for _ in read_ranges(kafka, requests_topic, idle_s=1.0))
    producer = DeliveryTracker(kafka)
    producer.send(requests_topic, b"not avro at all", key="junk")
    serde = serde_for("training_request")
    for request in requests.values():
        producer.send(requests_topic, serde.serialize(request, SerdeContext(requests_topic)), key=request["request_id"])
    producer.flush(30)

    # The run loop skips what an earlier test left on the topic: it is decided already (replays return it).
    assert run(group_settings, max_requests=start + 4, poll_s=0.5) == start + 4

    expected = {"empty": "too few training examples: 0", "below minimum": "too few training examples: 4",
                "single-class KTO": "single-class KTO data: 0 desirable and 10 undesirable"}
    for name, request in requests.items():
        decided = of_request(kafka, topics, request)
        assert len(decided) == 1 and decided[0]["state"] == "REJECTED", name
        assert expected[name] in decided[0]["reason"], decided[0]["reason"]
        assert decided[0]["artifact_uri"] is None and json.loads(decided[0]["evidence_json"])["error"]
        print(f"\n[{name}] REJECTED: {decided[0]['reason'][:140]}")
    dead = [p.record for p in read_decoded(kafka, topics.name("dead_letters"), "dead_letter", idle_s=1.0, timeout_s=60)]
    assert [d["value"] for d in dead] == [b"not avro at all"] and dead[0]["stage"] == "trainer"
    consumer = Consumer(consumer_config(kafka, group_settings.group_id))
    try:
        committed = consumer.committed([TopicPartition(requests_topic, 0)], timeout=30)
    finally:
        consumer.close()
    assert committed[0].offset == start + 4  # all committed: a restarted trainer would not see them again

    # A missing base model path, and adapters vLLM would refuse (rank above its max, a module the base lacks):
    # each a REJECTED record with the reason, before any training.
    good = training_request(tenant, produce_curated(kafka, curated_topic, [curated(c, "TRAIN", tenant=tenant) for c in cases]
                                                    + [curated(cases[0], "HOLDOUT", tenant=tenant)]))
    variants = {
        "missing base": (settings.model_copy(update={"model": ModelSettings(path=tmp_path / "no-model")}),
                         "base model unavailable: base model path"),
        "rank": (settings.model_copy(update={"recipe": {"lora_rank": 32}}), "rank 32 > max_lora_rank 16"),
        "targets": (settings.model_copy(update={"recipe": {"target_modules": ["q_proj", "qkv_proj"]}}),
                    "target modules ['qkv_proj'] do not exist in the base model"),
    }
    for name, (variant, reason) in variants.items():
        rejected = TrainerService(variant).process(good | {"request_id": f"req-{name}-{uuid.uuid4().hex[:8]}"})
        print(f"[{name}] {rejected['state']}: {rejected['reason'][:140]}")
        assert rejected["state"] == "REJECTED" and reason in rejected["reason"] and rejected["artifact_uri"] is None
    # Curation's catalogue defines the task otherwise than the trainer's (an edit deployed to one of them),
    # or not at all in the trainer's: refused before training, the difference on record.
    for task_digest, task, reason in (("sha256:" + "0" * 64, TASK, "differs between curation's catalogue"),
                                      (None, "not-in-this-catalogue", "unknown task 'not-in-this-catalogue'")):
        rejected = service.process(good | {"request_id": f"req-catalogue-{uuid.uuid4().hex[:8]}", "task": task,
                                           "task_digest": task_digest})
        print(f"[catalogue] {rejected['state']}: {rejected['reason'][:160]}")
        assert rejected["state"] == "REJECTED" and reason in rejected["reason"] and rejected["artifact_uri"] is None
    assert service.catalogue.disagreement(TASK, TASKS[TASK].digest) is None
    # ... and the service itself still trains the same request.
    assert service.plan_problem(*_plan(service, good), TASKS[TASK]) is None


def _plan(service, request):
    from adaptloop.trainers.snapshot import choose_method

    snapshot = service.snapshot(request, service.erasures())
    return choose_method(snapshot.train), snapshot


def test_the_trainer_serves_tenants_in_turn_and_status_shows_the_queue(kafka, topics, settings):
    """Three requests of one tenant queued before one of another: the trainer's run loop serves the second tenant
    second, not fourth (each is decided at once here: no examples, REJECTED), and status lists the queue in
    that order with each request's wait."""
    from adaptloop.ops.status import trainer_queue
    from adaptloop.trainers.service_loop import run

    empty = [{"topic": topics.name("curated"), "partition": 0, "start_offset": 0, "end_offset": 0}]
    requests = [training_request(tenant, empty) for tenant in ("busy-co", "busy-co", "busy-co", "quiet-co")]
    requests_topic = topics.name("training_requests")
    producer = DeliveryTracker(kafka)
    serde = serde_for("training_request")
    for request in requests:
        producer.send(requests_topic, serde.serialize(request, SerdeContext(requests_topic)), key=request["request_id"])
    producer.flush(30)
    order = [requests[i]["request_id"] for i in (0, 3, 1, 2)]
    queued = trainer_queue(requests, [], now_ms=int(time.time() * 1000))
    assert [q["request_id"] for q in queued] == order and all(q["waited_s"] >= 0 for q in queued)

    fresh = settings.model_copy(update={"topics": topics, "group_id": f"trainer-{uuid.uuid4().hex[:8]}"})
    assert run(fresh, max_requests=4, poll_s=0.5) == 4
    decided = [r["lineage"]["request_id"] for r in releases_on(kafka, topics)]
    print(f"\n[fair queue] arrival busy, busy, busy, quiet -> served {[r[:12] for r in decided]}")
    assert decided == order
