"""SFT recipe: a LoRA adapter trained with trl's ``SFTTrainer`` on prompt-completion examples.

The loss is on the completion only (trl's prompt-completion conversational format): the
prompt is the task's system prompt plus the user's message, the completion is the answer the
agent should have given. The output folder is a plain PEFT adapter (no ``modules_to_save``,
no DoRA) that vLLM can load at run time.

Ready-to-paste (trains on 64 generated order-extract examples, writes /tmp/adaptloop-sft)::

    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.sft --config trainers/recipes/sft.yaml
    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.sft --config trainers/recipes/sft.yaml --set epochs=2 --set output_dir=/tmp/x

The recipe knows nothing of Kafka or Ray: the trainer service materialises the examples and
Ray runs ``main(cfg)`` inside a worker (see ``adaptloop.trainers.ray_job``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from adaptloop.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

#: Every linear layer of a Llama block: the adapter learns a new output format quickly this way.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_LORA_RANK = 64


@dataclass
class SFTRecipeConfig:
    """Everything one SFT run needs; every field has a default except where the data comes from."""

    model_path: str = field(default="", metadata={"help": "HF model folder of the base model; empty means the bundled SmolLM2-135M-Instruct."})
    output_dir: str = field(default="/tmp/adaptloop-sft", metadata={"help": "Where the PEFT adapter folder is written (replaced if it exists)."})
    examples: list[dict] = field(default_factory=list, metadata={
        "help": "Training examples {prompt_messages: [{role, content}], completion}; the service passes them in-process."})
    train_file: str = field(default="", metadata={"help": "JSONL of examples, used when `examples` is empty."})
    generate_examples: int = field(default=0, metadata={
        "help": "Without examples or train_file: this many generated order-extract cases (demo and smoke runs)."})
    generate_seed: int = field(default=7, metadata={"help": "Seed of the generated cases."})
    task: str = field(default="", metadata={"help": "Built-in task whose system prompt is used when system_prompt is empty."})
    system_prompt: str = field(default="", metadata={
        "help": "Prepended as the system message when an example's prompt has none (the TaskSpec's prompt)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r (vLLM's --max-lora-rank must be at least this)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES),
                                      metadata={"help": "Module names that get a LoRA pair."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (linear decay after warmup)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps spent warming up the learning rate."})
    epochs: float = field(default=1, metadata={"help": "Passes over the training examples."})
    batch_size: int = field(default=4, metadata={"help": "Examples per optimizer step."})
    max_length: int = field(default=192, metadata={"help": "Tokens per example after the chat template; longer ones are truncated."})
    seed: int = field(default=1234, metadata={"help": "Seed of Python, numpy, torch and the data order."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast: for GPUs and CPUs with native bf16; very slow on AVX2."})
    threads: int = field(default=1, metadata={
        "help": "torch intra-op threads; 0 means torch's default (all cores). On a busy 2-core machine 2 threads thrash."})
    logging_steps: int = field(default=2, metadata={"help": "Report loss every this many steps."})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "SFTRecipeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown SFT recipe keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def validate(self) -> None:
        if not 1 <= self.lora_rank <= MAX_LORA_RANK:
            raise ConfigError(f"lora_rank must be in 1..{MAX_LORA_RANK}, got {self.lora_rank}")
        if self.epochs <= 0 or self.batch_size < 1 or self.max_length < 16:
            raise ConfigError("epochs, batch_size and max_length must be positive (max_length >= 16)")

    def resolved_system_prompt(self) -> str:
        if self.system_prompt or not self.task:
            return self.system_prompt
        from adaptloop.tasks import task_spec

        return task_spec(self.task).system_prompt

    def public(self) -> dict[str, Any]:
        """The config without the examples: what lineage records (``config_json``)."""
        values = dataclasses.asdict(self)
        values.pop("examples")
        return values


@dataclass(frozen=True)
class SFTResult:
    adapter_dir: str
    train_examples: int
    steps: int
    train_loss: float
    final_loss: float
    train_seconds: float
    log_history: list[dict] = field(default_factory=list)


def chat_prompt(prompt_messages: Sequence[Mapping[str, str]], system_prompt: str) -> list[dict[str, str]]:
    """The prompt as the model sees it: the example's messages, with the task's system prompt first
    unless the agent already sent one. Training and evaluation both use this."""
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt_messages]
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def to_prompt_completion(example: Mapping[str, Any], system_prompt: str) -> dict[str, list[dict[str, str]]]:
    """trl's conversational prompt-completion row: the loss falls on the completion only."""
    return {"prompt": chat_prompt(example["prompt_messages"], system_prompt),
            "completion": [{"role": "assistant", "content": example["completion"]}]}


def load_examples(cfg: SFTRecipeConfig) -> list[dict]:
    if cfg.examples:
        return list(cfg.examples)
    if cfg.train_file:
        with open(cfg.train_file) as f:
            return [json.loads(line) for line in f if line.strip()]
    if cfg.generate_examples:
        from adaptloop.tasks import OrderGenerator

        return [{"prompt_messages": [{"role": "user", "content": c.sentence}], "completion": c.answer}
                for c in OrderGenerator(cfg.generate_seed).cases(cfg.generate_examples)]
    raise ConfigError("no training data: give examples, train_file or generate_examples")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(cfg: SFTRecipeConfig, callbacks: Sequence[Any] = (),
         progress: Callable[[dict], None] | None = None) -> SFTResult:
    """Train the adapter and save it to ``cfg.output_dir``.

    ``callbacks`` are extra ``transformers.TrainerCallback``s; ``progress`` receives every logged
    metrics dict ({loss, step, epoch, ...}) — the caller decides where progress goes.
    """
    import shutil

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cfg.validate()
    examples = load_examples(cfg)
    if not examples:
        raise TrainingError("no training examples")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    model_path = cfg.model_path
    if not model_path:
        from adaptloop.model import ensure_base_model
        from adaptloop.settings import DEFAULT_HOME

        model_path = str(ensure_base_model(DEFAULT_HOME))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    system_prompt = cfg.resolved_system_prompt()
    rows = [to_prompt_completion(e, system_prompt) for e in examples]
    dataset = Dataset.from_list(rows)

    output = Path(cfg.output_dir)
    work = output.parent / (output.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    args = SFTConfig(
        output_dir=str(work),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a share of the steps (transformers 5)
        max_length=cfg.max_length,
        completion_only_loss=True,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        # trl defaults both to True; bf16 autocast on a CPU without AVX-512-BF16 is ~30x slower,
        # and checkpointing trades compute for memory that a 135M model does not need.
        bf16=cfg.bf16,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=False,
    )

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and progress is not None:
                progress({**logs, "step": state.global_step, "max_steps": state.max_steps})

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[_Progress(), *callbacks])
    started = time.monotonic()
    outcome = trainer.train()
    seconds = time.monotonic() - started

    staging = output.parent / (output.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(output, ignore_errors=True)
    os.replace(staging, output)
    shutil.rmtree(work, ignore_errors=True)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return SFTResult(adapter_dir=str(output), train_examples=len(rows), steps=trainer.state.global_step,
                     train_loss=float(outcome.training_loss), final_loss=float(losses[-1]) if losses else float("nan"),
                     train_seconds=seconds, log_history=list(trainer.state.log_history))


def read_config(path: str | None, overrides: Sequence[str]) -> SFTRecipeConfig:
    import yaml

    values: dict[str, Any] = {}
    if path:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    for item in overrides:
        key, _, raw = item.partition("=")
        values[key] = yaml.safe_load(raw)
    return SFTRecipeConfig.from_mapping(values)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of SFTRecipeConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override one field (YAML value).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = read_config(args.config, args.set)
    result = main(cfg, progress=lambda m: log.info("step %s/%s loss=%s", m["step"], m["max_steps"], m.get("loss", "-")))
    summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "log_history"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
