"""KTO recipe: a LoRA adapter trained with trl's ``KTOTrainer`` on unpaired good/bad verdicts.

KTO needs only a label per example (desirable or not), which is what validators and thumbs
up/down give: no corrected answer is required. The two classes are weighted so that their
weighted counts are equal (``class_weights``), as the KTO paper advises for imbalanced data.

Ready-to-paste (48 generated order-extract cases: correct JSON desirable, prose undesirable)::

    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.kto --config trainers/recipes/kto.yaml
    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.kto --config trainers/recipes/kto.yaml --set beta=0.2

Like every recipe it knows nothing of Kafka or Ray (see ``adaptloop.trainers.ray_job``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

from adaptloop.errors import TrainingError
from adaptloop.trainers.common import (RecipeResult, common_args, count_tokens, load_base, lora_config,
                                       progress_callback, prompt_text, recipe_cli, resolve_model_path, seed_everything,
                                       train_and_save)
from adaptloop.trainers.config import RecipeConfig

log = logging.getLogger(__name__)

METHOD = "kto"


@dataclass
class KTORecipeConfig(RecipeConfig):
    """One KTO run. Examples: {prompt_messages, completion, label: bool, tools_json?}, label true = desirable, the
    completion as the model writes the turn (text, then its ``<tool_call>`` blocks)."""

    method: ClassVar[str] = METHOD
    min_batch_size: ClassVar[int] = 2  # KTO's KL estimate pairs each row with another of its batch

    learning_rate: float = field(default=1e-3, metadata={"help": (
        "KTO's own: at 2e-3 its loss saturated within 8 steps on 32 verdicts and, on one data order, the "
        "candidate answered nothing right (0/12; 0.75 on another order).")})
    beta: float = field(default=0.1, metadata={"help": "KTO beta: higher keeps the policy closer to the base."})
    desirable_weight: float = field(default=0.0, metadata={"help": "Loss weight of desirable examples; 0 = from the class ratio."})
    undesirable_weight: float = field(default=0.0, metadata={"help": "Loss weight of undesirable examples; 0 = from the class ratio."})


def class_weights(desirable: int, undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) making the weighted class counts equal; the larger class keeps 1.0.

    Refuses single-class data: KTO learns from the contrast between the classes.
    """
    if desirable == 0 or undesirable == 0:
        raise TrainingError(f"single-class KTO data: {desirable} desirable and {undesirable} undesirable examples; "
                            "KTO needs both")
    if desirable >= undesirable:
        return 1.0, desirable / undesirable
    return undesirable / desirable, 1.0


def to_unpaired(example: Mapping[str, Any], system_prompt: str, tokenizer: Any) -> dict[str, Any]:
    """trl's standard unpaired-preference row: the prompt rendered with its tools, the answer as the model writes it."""
    return {"prompt": prompt_text(tokenizer, example, system_prompt), "completion": example["completion"],
            "label": bool(example["label"])}


def generated_examples(n: int, seed: int) -> list[dict]:
    from adaptloop.demo_tasks import OrderGenerator

    rows = []
    for i, case in enumerate(OrderGenerator(seed).cases(n)):
        good = i % 2 == 0
        truth = case.truth
        bad = f"{truth['customer']} ordered {truth['quantity']} {truth['product']} for {truth['city']}."
        rows.append({"prompt_messages": [{"role": "user", "content": case.sentence}],
                     "completion": case.answer if good else bad, "label": good})
    return rows


def main(cfg: KTORecipeConfig, callbacks: Sequence[Any] = (),
         progress: Callable[[dict], None] | None = None) -> RecipeResult:
    """Train the adapter and save it to ``cfg.output_dir``; resume from a checkpoint in ``cfg.work_dir``."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    cfg.validate()
    examples = list(cfg.examples) or generated_examples(cfg.generate_examples, cfg.generate_seed)
    if not examples:
        raise TrainingError("no training examples")
    desirable = sum(1 for e in examples if e["label"])
    weights = class_weights(desirable, len(examples) - desirable)
    if cfg.desirable_weight and cfg.undesirable_weight:
        weights = (cfg.desirable_weight, cfg.undesirable_weight)
    seed_everything(cfg.seed)
    model, tokenizer = load_base(resolve_model_path(cfg.model_path), cfg.threads)
    system_prompt = cfg.resolved_system_prompt()
    rows = [to_unpaired(e, system_prompt, tokenizer) for e in examples]
    # KTO runs each row and a mismatched (KL) row through the policy and the reference: ~4 passes.
    tokens_per_epoch = 4 * count_tokens(tokenizer, [r["prompt"] + r["completion"] for r in rows], cfg.max_length)
    work = cfg.work_dir or cfg.output_dir + ".work"
    args = KTOConfig(**common_args(output_dir=work, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                   learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio,
                                   logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, seed=cfg.seed,
                                   bf16=cfg.bf16),
                     max_length=cfg.max_length, beta=cfg.beta, desirable_weight=weights[0],
                     undesirable_weight=weights[1])
    log.info("kto: %d desirable, %d undesirable, weights %.2f/%.2f", desirable, len(rows) - desirable, *weights)
    steps_per_epoch = max(1, -(-len(rows) // cfg.batch_size))
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules),
                         callbacks=[progress_callback(progress, tokens_per_epoch / steps_per_epoch), *callbacks])
    return train_and_save(trainer, tokenizer, method=METHOD, output_dir=cfg.output_dir, work_dir=work,
                          train_examples=len(rows), tokens_per_epoch=tokens_per_epoch, epochs=cfg.epochs)


def cli(argv: list[str] | None = None) -> int:
    return recipe_cli(__doc__, KTORecipeConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
