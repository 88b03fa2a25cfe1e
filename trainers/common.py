"""Helpers the recipes share as plain functions (no recipe inherits another's code; their configs share
``adaptloop.trainers.config.RecipeConfig``).

Loading the base model, the LoRA config vLLM accepts, resuming from the newest checkpoint,
counting tokens, the progress callback, and saving the adapter atomically. Each recipe
(``sft``, ``kto``, ``dpo``) calls these from its own ``main(cfg)``.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecipeResult:
    """What every recipe returns; the service records it as the release's ``training_json``."""

    adapter_dir: str
    method: str
    train_examples: int
    steps: int
    train_loss: float
    final_loss: float
    train_seconds: float
    tokens: int = 0
    tokens_per_s: float = 0.0
    resumed_from_step: int = 0
    loss_curve: list[list[float]] = field(default_factory=list)
    peak_rss_mb: float = 0.0


def chat_prompt(prompt_messages: Sequence[Mapping[str, Any]], system_prompt: str) -> list[dict[str, Any]]:
    """The prompt as the model sees it: the example's messages (with their tool calls and tool results), with
    the task's system prompt first unless the agent already sent one. Training and evaluation both use this."""
    messages = [dict(m) for m in prompt_messages]
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_text(tokenizer: Any, example: Mapping[str, Any], system_prompt: str) -> str:
    """An example's prompt as vLLM renders it for that turn, its tools included. The preference recipes hand trl
    text (its standard format): trl tokenizes it as it is and ends each completion with the end-of-turn token,
    so a turn that calls tools trains on the very tokens vLLM serves."""
    from adaptloop.chat import render, tools_of

    return render(tokenizer, chat_prompt(example["prompt_messages"], system_prompt), tools_of(example.get("tools_json")),
                  add_generation_prompt=True)


def assistant(text: str, tool_calls: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": text} | ({"tool_calls": [dict(c) for c in tool_calls]} if tool_calls else {})]


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_model_path(model_path: str) -> str:
    if model_path:
        return model_path
    from adaptloop.model import ensure_base_model
    from adaptloop.settings import DEFAULT_HOME

    return str(ensure_base_model(DEFAULT_HOME))


def load_base(model_path: str, threads: int):
    """(model, tokenizer) in float32 with a pad token; ``threads`` torch threads (0: torch's default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    from adaptloop.chat import chat_template

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # The template vLLM serves with: what trl renders (KTO, DPO) is what serving renders.
    tokenizer.chat_template = chat_template()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model, tokenizer


def lora_config(rank: int, alpha: int, dropout: float, target_modules: Sequence[str]):
    """A plain LoRA config that vLLM loads at run time: no DoRA, no modules_to_save, no bias."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      bias="none", task_type="CAUSAL_LM", use_dora=False)


def common_args(*, output_dir: str, epochs: float, batch_size: int, learning_rate: float, warmup_ratio: float,
                logging_steps: int, save_steps: int, seed: int, bf16: bool) -> dict[str, Any]:
    """TrainingArguments every recipe sets the same way (CPU speed and resumability)."""
    import torch

    return dict(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=warmup_ratio,  # a float < 1 is a share of the steps (transformers 5)
        logging_steps=logging_steps,
        # Checkpoints (adapter + optimizer + scheduler + RNG) let a killed job resume.
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=max(save_steps, 1),
        save_total_limit=2,
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        # trl defaults both to True; bf16 autocast on a CPU without AVX-512-BF16 is ~30x slower,
        # and checkpointing trades compute for memory that a 135M model does not need.
        bf16=bf16,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def last_checkpoint(work_dir: str | Path) -> tuple[str | None, int]:
    """The newest ``checkpoint-N`` folder under ``work_dir`` and its step, or (None, 0)."""
    from transformers.trainer_utils import get_last_checkpoint

    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None, 0
    found = get_last_checkpoint(str(work_dir))
    if not found:
        return None, 0
    return found, int(Path(found).name.rsplit("-", 1)[-1])


def progress_callback(progress: Callable[[dict], None] | None, tokens_per_step: float):
    """A TrainerCallback that passes each logged metrics dict, with step and tokens/s, to ``progress``."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self) -> None:
            self.started = time.monotonic()
            self.first_step: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first_step = time.monotonic(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or progress is None:
                return
            steps_done = state.global_step - (self.first_step or 0)
            elapsed = max(time.monotonic() - self.started, 1e-9)
            progress({**logs, "step": state.global_step, "max_steps": state.max_steps,
                      "tokens_per_s": steps_done * tokens_per_step / elapsed})

    return _Progress()


def count_tokens(tokenizer, conversations: Sequence[Sequence[Mapping[str, str]] | str], max_length: int) -> int:
    """Tokens the trainer processes for these conversations, or rendered texts (each truncated to ``max_length``)."""
    total = 0
    for messages in conversations:
        if isinstance(messages, str):
            total += min(len(tokenizer(messages, add_special_tokens=False)["input_ids"]) + 1, max_length)  # + end of turn
            continue
        ids = tokenizer.apply_chat_template(list(messages), tokenize=True)
        if isinstance(ids, Mapping):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        total += min(len(ids), max_length)
    return total


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_and_save(trainer, tokenizer, *, method: str, output_dir: str, work_dir: str, train_examples: int,
                   tokens_per_epoch: int, epochs: float) -> RecipeResult:
    """Run ``trainer`` (resuming from the newest checkpoint in ``work_dir``), save the adapter to
    ``output_dir`` atomically, drop the checkpoints, and summarise the run."""
    checkpoint, resumed_from = last_checkpoint(work_dir)
    if checkpoint:
        log.info("%s: resuming from %s (step %d)", method, checkpoint, resumed_from)
    started = time.monotonic()
    outcome = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.monotonic() - started

    output = Path(output_dir)
    staging = output.parent / (output.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(output, ignore_errors=True)
    os.replace(staging, output)
    shutil.rmtree(work_dir, ignore_errors=True)

    state = trainer.state
    curve = [[int(h["step"]), float(h["loss"])] for h in state.log_history if "loss" in h and "step" in h]
    steps_run = max(state.global_step - resumed_from, 0)
    tokens = int(tokens_per_epoch * epochs * (steps_run / state.max_steps if state.max_steps else 1.0))
    return RecipeResult(
        adapter_dir=str(output), method=method, train_examples=train_examples, steps=state.global_step,
        train_loss=float(outcome.training_loss), final_loss=curve[-1][1] if curve else float("nan"),
        train_seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        resumed_from_step=resumed_from, loss_curve=curve, peak_rss_mb=peak_rss_mb())


def recipe_cli(doc: str, config_class, main: Callable, argv: Sequence[str] | None) -> int:
    """``python -m adaptloop.trainers.<recipe> --config X.yaml --set key=value``: train and print the summary."""
    import argparse
    import dataclasses
    import json

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", help=f"YAML file of {config_class.__name__} fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override one field (YAML value).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_class.from_yaml(args.config, args.set)
    result = main(cfg, progress=lambda m: log.info("step %s/%s loss=%s tokens/s=%.0f", m["step"], m["max_steps"],
                                                   m.get("loss", "-"), m.get("tokens_per_s", 0.0)))
    print(json.dumps({k: v for k, v in dataclasses.asdict(result).items() if k != "loss_curve"}, indent=2))
    return 0
