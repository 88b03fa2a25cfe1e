"""SFT recipe: a LoRA adapter trained with trl's ``SFTTrainer`` on conversations.

Each example is a trajectory: the prompt the target turn was asked with (the task's system prompt, the
user's messages, earlier assistant turns with their tool calls, the tools' results) and the turn the agent
should have taken (text and/or tool calls). It is rendered through the chat template vLLM serves with,
the tool definitions included (``adaptloop.chat``), and the loss falls on the assistant's turns only:
system, user and tool-result tokens are masked. The output folder is a plain PEFT adapter (no
``modules_to_save``, no DoRA) that vLLM can load at run time.

Ready-to-paste (trains on 64 generated order-extract examples, writes /tmp/adaptloop-sft)::

    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.sft --config trainers/recipes/sft.yaml
    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.sft --config trainers/recipes/sft.yaml --set epochs=2 --set output_dir=/tmp/x

The recipe knows nothing of Kafka or Ray: the trainer service materialises the examples and
Ray runs ``main(cfg)`` inside a worker (see ``adaptloop.trainers.ray_job``).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

from adaptloop.errors import ConfigError, TrainingError
from adaptloop.trainers.common import (RecipeResult, assistant, chat_prompt, common_args, load_base, lora_config,
                                       progress_callback, recipe_cli, resolve_model_path, seed_everything,
                                       train_and_save)
from adaptloop.trainers.config import DEFAULT_TARGET_MODULES, RecipeConfig

log = logging.getLogger(__name__)

METHOD = "sft"
#: The SFT recipe's result; every recipe returns the same shape.
SFTResult = RecipeResult
__all__ = ["SFTRecipeConfig", "SFTResult", "main", "chat_prompt", "to_prompt_completion", "DEFAULT_TARGET_MODULES"]


@dataclass
class SFTRecipeConfig(RecipeConfig):
    """One SFT run. Examples: {prompt_messages: [{role, content, tool_calls?}], completion, completion_tool_calls?,
    tools_json?}, the prompt being the trajectory so far and the completion the turn the agent should take."""

    method: ClassVar[str] = METHOD

    train_file: str = field(default="", metadata={"help": "JSONL of examples, used when `examples` is empty."})


def to_prompt_completion(example: Mapping[str, Any], system_prompt: str) -> dict[str, list[dict[str, Any]]]:
    """The conversation of one example: its prompt (the trajectory so far) and the target turn."""
    return {"prompt": chat_prompt(example["prompt_messages"], system_prompt),
            "completion": assistant(example["completion"], example.get("completion_tool_calls") or ())}


def tokenized(tokenizer: Any, example: Mapping[str, Any], system_prompt: str, max_length: int) -> dict[str, list[int]]:
    """The example through the chat template vLLM serves with (``adaptloop.chat.tokens``), tools included; the
    loss on every assistant turn (the target turn and the trajectory's earlier turns), nothing else."""
    from adaptloop.chat import tokens, tools_of

    row = to_prompt_completion(example, system_prompt)
    rendered = tokens(tokenizer, row["prompt"] + row["completion"], tools_of(example.get("tools_json")))
    return {"input_ids": rendered.input_ids[:max_length], "labels": rendered.labels[:max_length]}


def without_contained(rows: Sequence[Mapping[str, list[int]]]) -> list[Mapping[str, list[int]]]:
    """The rows less those another row holds whole: the same tokens and labels as that longer row's start.

    An agent's episode gives one example per turn, and the turn-k example carries turns 1..k-1 (with the loss
    on them) in its trajectory, so the examples of turns before it add no loss term of their own, only
    tokens: an episode of three turns costs half as many tokens this way, with every assistant turn still
    learned. Exact duplicates keep one copy."""
    def key(row: Mapping[str, list[int]], end: int) -> tuple:
        return tuple(row["input_ids"][:end]), tuple(row["labels"][:end])

    starts: set[tuple] = set()
    for row in rows:
        labels = row["labels"]
        # A shorter example ends after one of this row's assistant turns: its end-of-turn token, or the newline after it.
        for end in range(1, len(labels)):
            if labels[end - 1] != -100 and labels[end] == -100:
                starts.update(key(row, stop) for stop in (end, end + 1) if stop < len(labels))
    kept, seen = [], set()
    for row in rows:
        whole = key(row, len(row["input_ids"]))
        if whole in starts or whole in seen:
            continue
        seen.add(whole)
        kept.append(row)
    return kept


def load_examples(cfg: SFTRecipeConfig) -> list[dict]:
    if cfg.examples:
        return list(cfg.examples)
    if cfg.train_file:
        with open(cfg.train_file) as f:
            return [json.loads(line) for line in f if line.strip()]
    if cfg.generate_examples:
        from adaptloop.demo_tasks import OrderGenerator

        return [{"prompt_messages": [{"role": "user", "content": c.sentence}], "completion": c.answer}
                for c in OrderGenerator(cfg.generate_seed).cases(cfg.generate_examples)]
    raise ConfigError("no training data: give examples, train_file or generate_examples")


def main(cfg: SFTRecipeConfig, callbacks: Sequence[Any] = (),
         progress: Callable[[dict], None] | None = None) -> RecipeResult:
    """Train the adapter and save it to ``cfg.output_dir``; resume from a checkpoint in ``cfg.work_dir``.

    ``callbacks`` are extra ``transformers.TrainerCallback``s; ``progress`` receives every logged
    metrics dict ({loss, step, tokens_per_s, ...}) — the caller decides where progress goes.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg.validate()
    examples = load_examples(cfg)
    if not examples:
        raise TrainingError("no training examples")
    seed_everything(cfg.seed)
    model, tokenizer = load_base(resolve_model_path(cfg.model_path), cfg.threads)

    system_prompt = cfg.resolved_system_prompt()
    rows = without_contained([tokenized(tokenizer, e, system_prompt, cfg.max_length) for e in examples])
    if len(rows) < len(examples):
        log.info("%d of %d examples are held whole by a longer one (an episode's earlier turns): trained %d",
                 len(examples) - len(rows), len(examples), len(rows))
    dataset = Dataset.from_list(rows)
    tokens_per_epoch = sum(len(r["input_ids"]) for r in rows)
    work = cfg.work_dir or cfg.output_dir + ".work"
    args = SFTConfig(**common_args(output_dir=work, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                   learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio,
                                   logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, seed=cfg.seed,
                                   bf16=cfg.bf16),
                     max_length=cfg.max_length, completion_only_loss=True)
    steps_per_epoch = max(1, -(-len(rows) // cfg.batch_size))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules),
                         callbacks=[progress_callback(progress, tokens_per_epoch / steps_per_epoch), *callbacks])
    return train_and_save(trainer, tokenizer, method=METHOD, output_dir=cfg.output_dir, work_dir=work,
                          train_examples=len(rows), tokens_per_epoch=tokens_per_epoch, epochs=cfg.epochs)


def cli(argv: list[str] | None = None) -> int:
    return recipe_cli(__doc__, SFTRecipeConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
