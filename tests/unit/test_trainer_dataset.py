"""Pure parts of the trainer: dataset materialisation, incumbent choice, recipe config."""

from __future__ import annotations

import pytest

from adaptloop.errors import ConfigError
from adaptloop.trainers.evaluate import newest_live_adapter
from adaptloop.trainers.service import build_dataset
from adaptloop.trainers.sft import SFTRecipeConfig, chat_prompt, to_prompt_completion


def record(example_id: str, *, split: str = "TRAIN", tenant: str = "acme", task: str = "order-extract",
           admitted: bool = True, completion: str = "{}") -> dict:
    return {"example_id": example_id, "tenant": tenant, "task": task, "split": split, "kind": "CORRECTION",
            "admitted": admitted, "prompt_messages": [{"role": "user", "content": f"q {example_id}"}],
            "completion": completion}


def test_dataset_filters_dedupes_and_splits():
    records = [record("b"), record("a"), record("h", split="HOLDOUT"), record("a", completion="dup"),
               record("x", tenant="other"), record("y", task="other"), record("n", admitted=False)]
    dataset = build_dataset(records, "acme", "order-extract")
    assert dataset.train_ids == ["a", "b"]
    assert [e["example_id"] for e in dataset.holdout] == ["h"]
    assert dataset.train[0]["completion"] == "{}"  # first record of an id wins
    assert dataset.dropped == {"other_tenant_or_task": 2, "not_admitted": 1, "duplicate": 1}


def test_dataset_digest_ignores_order_and_duplicates_but_not_content():
    one = build_dataset([record("a"), record("b")], "acme", "order-extract")
    two = build_dataset([record("b"), record("a"), record("b")], "acme", "order-extract")
    three = build_dataset([record("a"), record("b", completion='{"x": 1}')], "acme", "order-extract")
    assert one.digest == two.digest != three.digest
    assert one.digest.startswith("sha256:")


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
