"""DPO recipe: a LoRA adapter trained with trl's ``DPOTrainer`` on correction pairs.

A correction pairs the answer the agent should have given (chosen) with the one it gave
(rejected). The loss is DPO's sigmoid loss plus an SFT (NLL) term on the chosen answer
(``loss_type: [sigmoid, sft]``, the RPO recipe): with few pairs, pure DPO mostly pushes the
rejected answer down without making the chosen one likely enough to be generated greedily.

Ready-to-paste (48 generated order-extract pairs: correct JSON chosen, prose rejected)::

    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.dpo --config trainers/recipes/dpo.yaml
    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.dpo --config trainers/recipes/dpo.yaml --set sft_weight=0

Like every recipe it knows nothing of Kafka or Ray (see ``adaptloop.trainers.ray_job``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

from adaptloop.errors import ConfigError, TrainingError
from adaptloop.trainers.common import (RecipeResult, common_args, count_tokens, load_base, lora_config,
                                       progress_callback, prompt_text, recipe_cli, resolve_model_path, seed_everything,
                                       train_and_save)
from adaptloop.trainers.config import RecipeConfig

log = logging.getLogger(__name__)

METHOD = "dpo"


@dataclass
class DPORecipeConfig(RecipeConfig):
    """One DPO run. Examples: {prompt_messages, chosen, rejected, tools_json?}, each answer as the model writes the
    turn (text, then its ``<tool_call>`` blocks: ``adaptloop.chat.assistant_text``)."""

    method: ClassVar[str] = METHOD

    beta: float = field(default=0.1, metadata={"help": "DPO beta: higher keeps the policy closer to the base."})
    sft_weight: float = field(default=1.0, metadata={"help": "Weight of the NLL term on chosen answers (0: pure DPO)."})

    def validate(self) -> None:
        super().validate()
        if self.sft_weight < 0:
            raise ConfigError(f"sft_weight must be >= 0, got {self.sft_weight}")


def to_pair(example: Mapping[str, Any], system_prompt: str, tokenizer: Any) -> dict[str, str]:
    """trl's standard preference row: the prompt rendered with its tools, each answer as the model writes it."""
    return {"prompt": prompt_text(tokenizer, example, system_prompt), "chosen": example["chosen"],
            "rejected": example["rejected"]}


def generated_examples(n: int, seed: int) -> list[dict]:
    from adaptloop.demo_tasks import OrderGenerator

    return [{"prompt_messages": [{"role": "user", "content": c.sentence}], "chosen": c.answer,
             "rejected": f"{c.truth['customer']} ordered {c.truth['quantity']} {c.truth['product']}."}
            for c in OrderGenerator(seed).cases(n)]


def main(cfg: DPORecipeConfig, callbacks: Sequence[Any] = (),
         progress: Callable[[dict], None] | None = None) -> RecipeResult:
    """Train the adapter and save it to ``cfg.output_dir``; resume from a checkpoint in ``cfg.work_dir``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg.validate()
    examples = list(cfg.examples) or generated_examples(cfg.generate_examples, cfg.generate_seed)
    if not examples:
        raise TrainingError("no training pairs")
    same = sum(1 for e in examples if e["chosen"] == e["rejected"])
    if same:
        raise TrainingError(f"{same} DPO pairs have chosen == rejected: nothing to prefer")
    seed_everything(cfg.seed)
    model, tokenizer = load_base(resolve_model_path(cfg.model_path), cfg.threads)
    system_prompt = cfg.resolved_system_prompt()
    rows = [to_pair(e, system_prompt, tokenizer) for e in examples]
    # Chosen and rejected, each through the policy and the reference (the adapter disabled).
    tokens_per_epoch = 2 * count_tokens(tokenizer, [r["prompt"] + r["chosen"] for r in rows]
                                        + [r["prompt"] + r["rejected"] for r in rows], cfg.max_length)
    work = cfg.work_dir or cfg.output_dir + ".work"
    loss = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.sft_weight]} if cfg.sft_weight else {
        "loss_type": ["sigmoid"]}
    args = DPOConfig(**common_args(output_dir=work, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                   learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio,
                                   logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, seed=cfg.seed,
                                   bf16=cfg.bf16),
                     max_length=cfg.max_length, beta=cfg.beta, **loss)
    steps_per_epoch = max(1, -(-len(rows) // cfg.batch_size))
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules),
                         callbacks=[progress_callback(progress, tokens_per_epoch / steps_per_epoch), *callbacks])
    return train_and_save(trainer, tokenizer, method=METHOD, output_dir=cfg.output_dir, work_dir=work,
                          train_examples=len(rows), tokens_per_epoch=tokens_per_epoch, epochs=cfg.epochs)


def cli(argv: list[str] | None = None) -> int:
    return recipe_cli(__doc__, DPORecipeConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
