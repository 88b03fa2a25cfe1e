"""Pure parts of the trainer: dataset snapshots, the method choice, incumbent choice, recipe config."""

from __future__ import annotations

import json

import pytest

from adaptloop.erasure import ErasureSet, build_erasure, subject_key
from adaptloop.errors import ConfigError, TrainingError
from adaptloop.trainers.evaluate import live_releases, newest_live_adapter
from adaptloop.trainers.kto import class_weights
from adaptloop.trainers.service import build_dataset
from adaptloop.trainers.sft import SFTRecipeConfig, chat_prompt, to_prompt_completion
from adaptloop.trainers.snapshot import (build_snapshot, choose_method, read_snapshot, signal_of, snapshot_uri,
                                         write_snapshot)

VERDICT = "outcome is not a success and carries no correction"


def record(example_id: str, *, split: str = "TRAIN", tenant: str = "acme", task: str = "order-extract",
           admitted: bool = True, completion: str = "{}", kind: str = "SUCCESS", rejected: str | None = None,
           reject_reason: str | None = None, subjects: list[str] | None = None, **extra) -> dict:
    return {"example_id": example_id, "tenant": tenant, "task": task, "session_id": f"s-{example_id}", "split": split,
            "kind": kind, "admitted": admitted, "reject_reason": reject_reason,
            "prompt_messages": [{"role": "user", "content": f"q {example_id}"}], "completion": completion,
            "rejected": rejected, "score": 1.0, "scorer": "order_json@1", "subjects": subjects or [],
            "redactions": [{"rule": "email", "count": 1}] if subjects else [], **extra}


def failure(example_id: str, reason: str = VERDICT, **kw) -> dict:
    return record(example_id, kind="FAILURE", admitted=False, reject_reason=reason, completion="bad answer", **kw)


def test_dataset_filters_keeps_the_last_record_per_example_and_splits():
    records = [record("b"), record("a"), record("h", split="HOLDOUT"), record("a", completion="later"),
               record("x", tenant="other"), record("y", task="other"), failure("n", reason="correction rejected by v")]
    dataset = build_dataset(records, "acme", "order-extract")
    assert dataset.train_ids == ["a", "b"]
    assert [e["example_id"] for e in dataset.holdout] == ["h"]
    assert dataset.train[0]["completion"] == "later"  # curation re-emits an example: the last record wins
    assert dataset.manifest["dropped"] == {"other_tenant_or_task": 2, "superseded": 1, "erased": 0, "no_signal": 1,
                                           "holdout_not_desirable": 0}
    assert dataset.manifest["counts"]["train"] == {"SUCCESS": 2}


def test_dataset_digest_is_stable_and_follows_content():
    one = build_dataset([record("a"), record("b")], "acme", "order-extract")
    two = build_dataset([record("a"), record("b")], "acme", "order-extract")
    three = build_dataset([record("a"), record("b", completion='{"x": 1}')], "acme", "order-extract")
    assert one.digest == two.digest != three.digest
    assert one.digest.startswith("sha256:")


def test_erasure_excludes_examples_records_it_and_changes_the_digest():
    alice = subject_key("acme", "alice@example.com", "dataset-test-secret-0123456789")
    records = [record("a"), record("b", subjects=[alice]), record("c"), record("h", split="HOLDOUT", subjects=[alice])]
    before = build_dataset(records, "acme", "order-extract")
    erasure = build_erasure(tenant="acme", scope="SUBJECT", key=alice, erasure_id="e-1")
    by_id = build_erasure(tenant="acme", scope="INTERACTION", key="c", erasure_id="e-2")
    other_tenant = build_erasure(tenant="other", scope="INTERACTION", key="a", erasure_id="e-3")
    after = build_dataset(records, "acme", "order-extract", ErasureSet.of([erasure, by_id, other_tenant]))
    assert before.train_ids == ["a", "b", "c"] and after.train_ids == ["a"]
    assert after.holdout == []
    assert after.manifest["erasures"] == {"excluded": 3, "erasure_ids": ["e-1", "e-2"]}
    assert after.manifest["redaction_rules"] == {}  # the erased examples' redactions went with them
    assert before.manifest["redaction_rules"] == {"email": 2}
    assert after.digest != before.digest


def test_signal_of_each_kind():
    assert signal_of(record("a")) == "desirable"
    assert signal_of(record("a", kind="CORRECTION", rejected="old")) == "desirable"
    assert signal_of(failure("f")) == "undesirable"
    assert signal_of(failure("f", reason="outcome says success but order_json@1 rejects the response: x")) == "undesirable"
    assert signal_of(failure("f", reason="outcome tenant 'x' is not the interaction's 'acme'")) is None
    assert signal_of(failure("f", reason="correction rejected by order_json@1: not JSON")) is None
    assert signal_of(failure("f", near_duplicate_of="g")) is None
    assert signal_of(record("f", kind="FAILURE", admitted=False, reject_reason=VERDICT, completion=" ")) is None


def rows(records):
    return build_dataset(records, "acme", "order-extract").train


def test_the_method_follows_the_signal():
    successes = [record(f"s{i}") for i in range(4)]
    pairs = [record(f"p{i}", kind="CORRECTION", completion="right", rejected="wrong") for i in range(3)]
    failures = [failure(f"f{i}") for i in range(2)]
    sft = choose_method(rows(successes + [record("c", kind="CORRECTION", rejected=None)]))
    assert sft.method == "sft" and len(sft.examples) == 5 and set(sft.examples[0]) == {"prompt_messages", "completion", "completion_tool_calls", "tools_json"}
    dpo = choose_method(rows(pairs))
    assert dpo.method == "dpo" and dpo.examples[0]["chosen"] == "right" and dpo.examples[0]["rejected"] == "wrong"
    kto = choose_method(rows(successes + failures))
    assert kto.method == "kto" and [e["label"] for e in kto.examples].count(False) == 2
    assert "mixture" not in kto.counts
    mix = choose_method(rows(successes + pairs + failures))
    assert mix.method == "kto" and mix.counts["mixture"] == 1
    assert [e["label"] for e in mix.examples].count(False) == 2 + 3  # failures + corrected originals
    forced = choose_method(rows(successes + pairs + failures), "sft")
    assert forced.method == "sft" and len(forced.examples) == 7  # every right answer, failures unused
    assert choose_method(rows(successes + pairs), "dpo").method == "dpo"
    assert len(choose_method(rows(successes + pairs), "dpo").examples) == 3
    only_bad = choose_method(rows(failures))
    assert only_bad.method == "kto" and not any(e["label"] for e in only_bad.examples)


def test_kto_class_weights_equalise_the_classes_and_refuse_one_class():
    assert class_weights(30, 10) == (1.0, 3.0)
    assert class_weights(10, 40) == (4.0, 1.0)
    with pytest.raises(TrainingError, match="single-class KTO"):
        class_weights(0, 12)


def test_snapshot_store_roundtrip_is_immutable(tmp_path):
    records = [record("a"), record("b", kind="CORRECTION", rejected="x"), failure("f"), record("h", split="HOLDOUT")]
    ranges = [{"topic": "c", "partition": 0, "start_offset": 0, "end_offset": 4}]
    built = build_snapshot([(0, i, r) for i, r in enumerate(records)], tenant="acme", task="order-extract",
                           ranges=ranges)
    store = f"file://{tmp_path}"
    written = write_snapshot(built, store)
    assert written.uri == snapshot_uri(store, built.digest)
    back = read_snapshot(written.uri)
    assert back.manifest == built.manifest and back.train == built.train and back.holdout == built.holdout
    assert back.manifest["source"] == ranges and back.manifest["counts"]["train_signal"] == {
        "desirable": 2, "undesirable": 1, "pairs": 1}
    manifest = tmp_path / "datasets" / built.digest.removeprefix("sha256:") / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert write_snapshot(built, str(tmp_path)).uri.endswith(built.digest.removeprefix("sha256:"))
    assert manifest.stat().st_mtime_ns == stamp  # written once
    assert read_snapshot(written.uri, splits=("holdout",)).train == []


def release(version: str, state: str, tenant: str = "acme", uri: str | None = "/a") -> dict:
    return {"version": version, "tenant": tenant, "task": "order-extract", "state": state, "artifact_uri": uri,
            "digest": "sha256:0"}


def test_incumbent_is_the_newest_live_adapter_of_the_tenant():
    assert newest_live_adapter([], "acme", "order-extract").version == "base"
    history = [release("v1", "RELEASED"), release("v2", "RELEASED"), release("v3", "RELEASED", tenant="other"),
               release("v2", "ROLLED_BACK"), release("v4", "REJECTED")]
    assert newest_live_adapter(history, "acme", "order-extract").version == "v1"
    assert newest_live_adapter(history + [release("v5", "PROMOTED"), release("v6", "RELEASED")],
                               "acme", "order-extract").version == "v6"
    assert newest_live_adapter(history + [release("v1", "PROMOTED")], "acme", "order-extract").version == "v1"
    assert newest_live_adapter([release("v7", "RELEASED", uri=None)], "acme", "order-extract").version == "base"
    assert [r["version"] for r in live_releases(history, "acme")] == ["v1"]


def test_prompt_gets_the_task_system_prompt_unless_it_has_one():
    user = [{"role": "user", "content": "hi"}]
    assert chat_prompt(user, "SYS")[0] == {"role": "system", "content": "SYS"}
    own = [{"role": "system", "content": "mine"}, *user]
    assert chat_prompt(own, "SYS") == own
    row = to_prompt_completion({"prompt_messages": user, "completion": "{}"}, "SYS")
    assert row["completion"] == [{"role": "assistant", "content": "{}"}]


def test_recipe_config_refuses_unknown_keys_and_big_ranks():
    with pytest.raises(ConfigError):
        SFTRecipeConfig.from_mapping({"lora_rnak": 8})
    with pytest.raises(ConfigError):
        SFTRecipeConfig(lora_rank=128).validate()
    assert "examples" not in SFTRecipeConfig(examples=[{"x": 1}]).public()


def test_an_episodes_earlier_turns_are_trained_inside_its_last_turn_once():
    """Three per-turn examples of one right episode train as one row (its last turn, the loss on all three turns);
    a turn whose history holds a wrong turn, or the same example twice, is not dropped as contained."""
    import json

    from transformers import AutoTokenizer

    from adaptloop.model import ensure_base_model
    from adaptloop.settings import DEFAULT_HOME
    from adaptloop.support_task import TOOLS, SupportWorld, _wire
    from adaptloop.trainers.sft import tokenized, without_contained

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_base_model(DEFAULT_HOME)))
    world = SupportWorld(3)
    case = next(c for c in iter(world.case, None) if c.intent == "refund")
    messages, examples = [{"role": "user", "content": case.request}], []
    for k, right in enumerate(case.expected_turns(), start=1):
        examples.append({"prompt_messages": list(messages), "completion": right.get("content") or "",
                         "completion_tool_calls": right.get("tool_calls") or [], "tools_json": json.dumps(TOOLS)})
        if right.get("tool_calls"):
            calls = _wire(right["tool_calls"], k)
            messages += [{"role": "assistant", "content": None, "tool_calls": calls}]
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": "{}"} for c in calls]
    rows = [tokenized(tokenizer, e, "Be brief.", 1024) for e in examples]
    assert without_contained(rows) == [rows[2]]
    assert sum(r["labels"][i] != -100 for r in rows[2:] for i in range(len(r["labels"]))) > \
        sum(r["labels"][i] != -100 for r in rows[1:2] for i in range(len(r["labels"])))
    wrong_history = examples[1] | {"prompt_messages": [examples[1]["prompt_messages"][0],
                                                       {"role": "assistant", "content": "I cannot help."}]}
    other = tokenized(tokenizer, wrong_history, "Be brief.", 1024)
    assert without_contained([rows[0], other, other]) == [rows[0], other]


def tool_turn_row(kind: str = "CORRECTION", *, signal_admitted: bool = True) -> dict:
    """A snapshot row of a support-agent turn the agent got wrong: it handed off where a refund was right."""
    from adaptloop.ops.tool_offline import trajectories

    turn = next(e for e in trajectories(20) if e["completion_tool_calls"] and e["completion_tool_calls"][0]["name"] == "refund")
    wrong = [{"id": "call_9", "name": "handoff_to_person", "arguments": json.dumps(json.loads(
        turn["completion_tool_calls"][0]["arguments"]) | {"amount": None})}]
    return {"example_id": f"ex-{kind}", "kind": kind, "admitted": signal_admitted, "split": "TRAIN",
            "signal": "desirable", "prompt_messages": turn["prompt_messages"], "tools_json": turn["tools_json"],
            "completion": "", "completion_tool_calls": turn["completion_tool_calls"], "rejected": "",
            "rejected_tool_calls": wrong}


def test_a_corrected_tool_turn_is_a_pair_and_preference_data_keeps_its_tools():
    """A turn whose correction and original are both tool calls (no text) is a DPO pair; the preference
    examples carry each answer as the model writes it (``<tool_call>`` blocks) and the turn's tools."""
    from adaptloop.trainers.snapshot import choose_method, is_pair

    row = tool_turn_row()
    assert is_pair(row) and not is_pair(row | {"rejected_tool_calls": row["completion_tool_calls"]})
    plan = choose_method([row])
    assert plan.method == "dpo"
    pair = plan.examples[0]
    assert pair["chosen"].startswith('<tool_call>\n{"name": "refund"') and '"handoff_to_person"' in pair["rejected"]
    assert pair["tools_json"] == row["tools_json"] and pair["prompt_messages"][-1]["role"] == "tool"
    mixture = choose_method([row, dict(row, example_id="ex-2", kind="SUCCESS", rejected_tool_calls=[])])
    assert mixture.method == "kto" and [e["label"] for e in mixture.examples] == [True, True, False]
    assert '"handoff_to_person"' in mixture.examples[-1]["completion"]


def test_trl_tokenizes_a_preference_row_into_the_tokens_vllm_serves():
    """The DPO/KTO rows are text (trl's standard format); trl tokenizes prompt + answer + end of turn as they are
    (``trl.data_utils._tokenize``, what its trainers call), which must be the very ids the trainer's own rendering
    gives for that conversation and tools (``adaptloop.chat.tokens``, checked against vLLM's /tokenize in
    tests/integration/test_tools.py), ending at the turn's end token."""
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize

    from adaptloop.chat import tokens, tools_of
    from adaptloop.model import ensure_base_model
    from adaptloop.settings import DEFAULT_HOME
    from adaptloop.trainers.common import chat_prompt
    from adaptloop.trainers.dpo import to_pair
    from adaptloop.trainers.snapshot import choose_method

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_base_model(DEFAULT_HOME)))
    row = tool_turn_row()
    pair = to_pair(choose_method([row]).examples[0], "Be brief.", tokenizer)
    for side, calls in (("chosen", row["completion_tool_calls"]), ("rejected", row["rejected_tool_calls"])):
        trl_ids = _tokenize(tokenizer, pair["prompt"] + pair[side] + tokenizer.eos_token)["input_ids"]
        ours = tokens(tokenizer, chat_prompt(row["prompt_messages"], "Be brief.")
                      + [{"role": "assistant", "content": "", "tool_calls": calls}], tools_of(row["tools_json"]))
        mask = ours.assistant_mask
        turn_start = max(i for i in range(1, len(mask)) if mask[i] and not mask[i - 1])
        turn_end = max(i for i, m in enumerate(mask) if m) + 1
        assert trl_ids == ours.input_ids[:turn_end], side
        assert _tokenize(tokenizer, pair["prompt"])["input_ids"] == ours.input_ids[:turn_start]
