"""Pure parts of the gate and the release checks: the paired sign test, decisions, Wilson intervals, vLLM's rules,
base digest."""

from __future__ import annotations

import json
import math

import pytest

from adaptloop.artifacts import base_model_digest
from adaptloop.errors import ArtifactError, TrainingError
from adaptloop.trainers.gate import decide, discordant_pairs, regression_result, sign_test, wilson_interval
from adaptloop.trainers.release import ReleaseCheckError, check_adapter, lora_violations

BASE_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"}


def test_wilson_interval_known_values_and_edges():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 24)[0] == 0.0 and 0.1 < wilson_interval(0, 24)[1] < 0.16
    assert wilson_interval(24, 24)[1] == 1.0 and wilson_interval(24, 24)[0] > 0.85
    assert wilson_interval(0, 0) == (0.0, 0.0)


def scored(name: str, verdicts: str) -> dict:
    """An EvalResult as a dict; ``verdicts``: one character per holdout item, 1 = passed, 0 = failed."""
    passed = [v == "1" for v in verdicts]
    return {"name": name, "score": sum(passed) / len(passed) if passed else 0.0, "passed": sum(passed),
            "count": len(passed), "verdicts": tuple(passed), "items": tuple(f"ex-{i}" for i in range(len(passed))),
            "unit": "example"}


def paired(name: str, both: int, only: int, other_only: int, neither: int) -> tuple[dict, dict]:
    """(candidate, incumbent) on one holdout: ``both`` pass both, ``only`` only the candidate, ``other_only``
    only the incumbent, ``neither`` neither."""
    c = "1" * both + "1" * only + "0" * other_only + "0" * neither
    i = "1" * both + "0" * only + "1" * other_only + "0" * neither
    return scored(name, c), scored("v1", i)


def gate(candidate, incumbent, suite=(), **kw):
    return decide(candidate=candidate, incumbent=incumbent, margin=kw.pop("margin", 0.05), suite=list(suite),
                  tolerance=0.05, **kw)


@pytest.mark.parametrize("b, c, p", [(8, 0, 1 / 256), (3, 0, 0.125), (0, 0, 1.0), (5, 1, 7 / 64), (0, 3, 1.0),
                                     (10, 2, 79 / 4096)])
def test_sign_test_is_the_exact_binomial_tail(b, c, p):
    assert sign_test(b, c) == pytest.approx(p, rel=1e-9)
    n = b + c
    assert sign_test(b, c) == pytest.approx(sum(math.comb(n, k) for k in range(b, n + 1)) / 2 ** n if n else 1.0)


def test_discordant_pairs_and_the_same_holdout():
    candidate, incumbent = paired("v2", both=5, only=3, other_only=1, neither=2)
    assert discordant_pairs(candidate, incumbent) == (3, 1)
    with pytest.raises(TrainingError, match="same holdout"):
        discordant_pairs(candidate, scored("v1", "1" * 10))
    shuffled = incumbent | {"items": tuple(reversed(incumbent["items"]))}
    with pytest.raises(TrainingError, match="same items in the same order"):
        discordant_pairs(candidate, shuffled)
    with pytest.raises(TrainingError, match="no holdout items"):
        discordant_pairs(scored("v2", ""), scored("v1", ""))


def test_a_clearly_better_candidate_on_a_large_holdout_is_released_at_the_configured_share():
    candidate, incumbent = paired("v2", both=20, only=12, other_only=1, neither=7)
    better = gate(candidate, incumbent, canary_share=0.2)
    assert better.passed and better.verdict == "better" and better.canary_share is None  # the gateways' share
    test = better.evidence["test"]
    assert (test["b"], test["c"], test["n"], test["holdout"]) == (12, 1, 13, 40)
    assert test["name"] == "exact sign test on discordant pairs" and test["p_better"] == pytest.approx(14 / 8192)
    assert test["alpha"] == pytest.approx(0.05) and better.evidence["verdict"] == "better"
    assert better.reason.startswith("better:") and "12 only the candidate passes, 1 only the incumbent" in better.reason
    assert "verdicts" not in better.evidence["candidate"] and better.evidence["candidate"]["ci95"][0] > 0.6


def test_a_tiny_holdout_is_undecided_and_goes_to_a_small_canary():
    # 3 of 3 only for the candidate: p = 1/8, not significant at 95%; the share follows the uncertainty.
    candidate, incumbent = paired("v2", both=0, only=3, other_only=0, neither=0)
    undecided = gate(candidate, incumbent, canary_share=0.1)
    assert undecided.passed and undecided.verdict == "undecided"
    assert undecided.canary_share == pytest.approx(0.1 * (1 - 0.125))
    assert "undecided" in undecided.reason and "-> canary at share 0.0875" in undecided.reason
    assert undecided.evidence["canary_share"] == undecided.canary_share
    # At 80% confidence the same pairs decide.
    assert gate(candidate, incumbent, confidence=0.8).verdict == "better"
    # Fewer pairs, less evidence, a smaller share: 1 of 1 -> half the share, none -> a tenth.
    one = gate(*paired("v2", both=0, only=1, other_only=0, neither=1), canary_share=0.1)
    assert one.verdict == "undecided" and one.canary_share == pytest.approx(0.05)


def test_both_saturated_or_both_failing_is_undecided_at_a_tenth_of_the_share():
    for verdicts in ("1" * 23, "0" * 2):
        tie = gate(scored("v2", verdicts), scored("v1", verdicts), canary_share=0.1)
        assert tie.passed and tie.verdict == "undecided" and tie.evidence["test"]["n"] == 0
        assert tie.evidence["test"]["p_better"] == 1.0 and tie.canary_share == pytest.approx(0.01)


def test_a_worse_candidate_is_rejected_significant_or_not():
    worse = gate(*paired("v2", both=10, only=1, other_only=9, neither=0))
    assert not worse.passed and worse.verdict == "worse" and worse.canary_share is None
    assert worse.reason.startswith("worse on the pairs that differ")
    slightly = gate(*paired("v2", both=10, only=0, other_only=1, neither=0))
    assert not slightly.passed and slightly.verdict == "worse"


def test_significant_but_under_the_margin_is_not_better():
    candidate, incumbent = paired("v2", both=300, only=40, other_only=10, neither=650)  # gain 0.03, p ~ 1e-5
    small = gate(candidate, incumbent, margin=0.05)
    assert not small.passed and small.verdict == "not better" and small.evidence["test"]["p_better"] < 1e-4
    assert gate(candidate, incumbent, margin=0.02).verdict == "better"


def test_the_regression_suite_still_rejects():
    forgot = regression_result(task="a", source_version="v1", holdout_count=20, candidate_score=0.1, bar=0.95,
                               tolerance=0.05)
    kept = regression_result(task="a", source_version="v0", holdout_count=20, candidate_score=0.9, bar=0.95,
                             tolerance=0.05)
    assert not forgot.passed and kept.passed
    candidate, incumbent = paired("v2", both=0, only=19, other_only=0, neither=1)
    caught = gate(candidate, incumbent, suite=[kept, forgot])
    assert not caught.passed and caught.verdict == "better" and caught.canary_share is None
    assert "regression: a holdout of v1" in caught.reason and caught.evidence["regression_passed"] is False
    assert [r["passed"] for r in caught.evidence["regression"]] == [True, False]
    # An undecided candidate that forgets is rejected too, and gets no share.
    undecided = gate(*paired("v2", both=0, only=1, other_only=0, neither=1), suite=[forgot])
    assert not undecided.passed and undecided.canary_share is None and "-> canary" not in undecided.reason
    assert gate(candidate, incumbent, suite=[kept]).passed


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
