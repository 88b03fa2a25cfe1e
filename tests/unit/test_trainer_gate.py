"""Pure parts of the gate and the release checks: Wilson intervals, decisions, vLLM's rules, base digest."""

from __future__ import annotations

import json

import pytest

from adaptloop.artifacts import base_model_digest
from adaptloop.errors import ArtifactError
from adaptloop.trainers.gate import decide, regression_result, wilson_interval
from adaptloop.trainers.release import ReleaseCheckError, check_adapter, lora_violations

BASE_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"}


def test_wilson_interval_known_values_and_edges():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 24)[0] == 0.0 and 0.1 < wilson_interval(0, 24)[1] < 0.16
    assert wilson_interval(24, 24)[1] == 1.0 and wilson_interval(24, 24)[0] > 0.85
    assert wilson_interval(0, 0) == (0.0, 0.0)


def scored(name: str, passed: int, count: int = 20) -> dict:
    return {"name": name, "score": passed / count, "passed": passed, "count": count}


def test_gate_releases_only_a_better_candidate_that_forgets_nothing():
    ok = decide(candidate=scored("v2", 18), incumbent=scored("base", 2), margin=0.05, suite=[], tolerance=0.05)
    assert ok.passed and ok.evidence["ci_separated"] and ok.evidence["candidate"]["ci95"][0] > 0.6
    worse = decide(candidate=scored("v2", 10), incumbent=scored("v1", 18), margin=0.05, suite=[], tolerance=0.05)
    assert not worse.passed and "<" in worse.reason and not worse.evidence["beats_incumbent"]
    tie = decide(candidate=scored("v2", 10), incumbent=scored("v1", 10), margin=0.05, suite=[], tolerance=0.05)
    assert not tie.passed
    forgot = regression_result(task="a", source_version="v1", holdout_count=20, candidate_score=0.1, bar=0.95,
                               tolerance=0.05)
    kept = regression_result(task="a", source_version="v0", holdout_count=20, candidate_score=0.9, bar=0.95,
                             tolerance=0.05)
    assert not forgot.passed and kept.passed
    caught = decide(candidate=scored("v2", 19), incumbent=scored("base", 0), margin=0.05, suite=[kept, forgot],
                    tolerance=0.05)
    assert not caught.passed and "regression: a holdout of v1" in caught.reason
    assert [r["passed"] for r in caught.evidence["regression"]] == [True, False]


def test_lora_rules_of_vllm():
    assert lora_violations(rank=16, target_modules=["q_proj"], max_lora_rank=16, base_modules=BASE_MODULES) == []
    problems = lora_violations(rank=32, target_modules=["q_proj", "qkv_proj"], max_lora_rank=16,
                               base_modules=BASE_MODULES, modules_to_save=["lm_head"], use_dora=True)
    assert len(problems) == 4
    assert any("rank 32 > max_lora_rank 16" in p for p in problems)
    assert any("['qkv_proj'] do not exist" in p for p in problems)


def adapter_folder(tmp_path, **config) -> str:
    folder = tmp_path / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                            "target_modules": ["q_proj"]} | config))
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    return str(folder)


@pytest.fixture
def base_dir(tmp_path):
    """A base folder whose safetensors header names one Llama layer's modules (no real weights needed)."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "base"
    folder.mkdir()
    save_file({f"model.layers.0.self_attn.{m}.weight": torch.zeros(1) for m in ("q_proj", "v_proj")}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def test_check_adapter_refuses_modules_to_save_dora_and_unknown_targets(tmp_path, base_dir):
    assert check_adapter(adapter_folder(tmp_path), max_lora_rank=16, base_dir=base_dir)["r"] == 8
    for i, bad in enumerate([{"modules_to_save": ["lm_head"]}, {"use_dora": True}, {"target_modules": ["gate_proj"]},
                             {"r": 64}, {"peft_type": "IA3"}]):
        with pytest.raises(ReleaseCheckError, match="vLLM's rules"):
            check_adapter(adapter_folder(tmp_path / str(i), **bad), max_lora_rank=16, base_dir=base_dir)


def test_base_model_digest_follows_config_and_weights(tmp_path, base_dir):
    first = base_model_digest(base_dir)
    assert first == base_model_digest(base_dir) and first.startswith("sha256:")
    (base_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": 1}')
    second = base_model_digest(base_dir)
    (base_dir / "model-2.safetensors").write_bytes(b"12")
    assert len({first, second, base_model_digest(base_dir)}) == 3
    with pytest.raises(ArtifactError):
        base_model_digest(tmp_path / "nowhere")
