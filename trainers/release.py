"""Release checks: what vLLM will accept, checked before training (the plan) and before publishing (the folder).

vLLM's runtime LoRA loading refuses, or silently mis-serves, adapters that break its rules:
a rank above ``--max-lora-rank``, ``modules_to_save`` (full copies of layers it cannot swap per
request), DoRA (not supported by its punica kernels), or target modules the base does not have.
An adapter that breaks one becomes a REJECTED release with the violations as its reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from adaptloop.errors import ReleaseCheckError

__all__ = ["ReleaseCheckError", "base_module_names", "check_adapter", "check_plan", "lora_violations"]


def base_module_names(base_dir: Path | str) -> set[str]:
    """Leaf module names of the base model's weights (``q_proj``, ``down_proj`` ...), read from the
    safetensors headers only (no tensor is loaded)."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
                    names.add(parts[-2])
    return names


def lora_violations(*, rank: int, target_modules: Iterable[str], max_lora_rank: int, base_modules: set[str],
                    modules_to_save: Iterable[str] | None = None, use_dora: bool = False) -> list[str]:
    """Every rule an adapter with these settings breaks; pure."""
    problems = []
    if rank > max_lora_rank:
        problems.append(f"rank {rank} > max_lora_rank {max_lora_rank}")
    if modules_to_save:
        problems.append(f"modules_to_save {sorted(modules_to_save)} (vLLM cannot swap full layers per request)")
    if use_dora:
        problems.append("DoRA (use_dora=true) is not supported by vLLM")
    targets = sorted(target_modules or [])
    if not targets:
        problems.append("no target modules")
    missing = [t for t in targets if t not in base_modules]
    if missing:
        problems.append(f"target modules {missing} do not exist in the base model")
    return problems


def check_plan(*, rank: int, target_modules: Iterable[str], max_lora_rank: int, base_dir: Path | str) -> None:
    """Before training: refuse a plan whose adapter vLLM would not load."""
    problems = lora_violations(rank=rank, target_modules=target_modules, max_lora_rank=max_lora_rank,
                               base_modules=base_module_names(base_dir))
    if problems:
        raise ReleaseCheckError(problems)


def check_adapter(adapter_dir: Path | str, *, max_lora_rank: int, base_dir: Path | str) -> dict:
    """Before publishing: refuse an adapter folder vLLM would not load; return its adapter_config."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise ReleaseCheckError([f"{config_path} is missing"])
    config = json.loads(config_path.read_text())
    if not any(Path(adapter_dir).glob("adapter_model.*")):
        raise ReleaseCheckError([f"no adapter_model weights in {adapter_dir}"])
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # peft stores a regex as a string: vLLM matches names, not patterns
        targets = [targets]
    problems = lora_violations(rank=int(config.get("r", 0)), target_modules=targets, max_lora_rank=max_lora_rank,
                               base_modules=base_module_names(base_dir), modules_to_save=config.get("modules_to_save"),
                               use_dora=bool(config.get("use_dora")))
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')} is not LORA")
    if problems:
        raise ReleaseCheckError(problems)
    return config
