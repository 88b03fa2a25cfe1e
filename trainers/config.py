"""The recipe configs' shared base, and how a run's config is built from its layers.

As in trl (``SFTConfig`` over ``TrainingArguments``), ``RecipeConfig`` holds the fields every recipe
has, each with its default and help; ``SFTRecipeConfig``, ``KTORecipeConfig`` and ``DPORecipeConfig``
add only their own (and redeclare a default only where their method needs another one).

``trainers/recipes/<method>.yaml`` holds what a recipe sets differently from these defaults; it is read
both by the recipe's command line and by the trainer service, which builds each request's config as
(later layers win):

1. the recipe YAML (``TrainerSettings.recipes_dir``, else the bundled ``trainers/recipes/``), less its
   per-run fields (``RUN_FIELDS``: which data and where the adapter goes, set by the request);
2. ``TrainerSettings.recipe``: this deployment's values for any recipe field (``ADAPTLOOP_TRAINER_RECIPE``
   as JSON, e.g. ``{"epochs": 2}``), each applied to the recipes that have it;
3. the task's catalogue entry: its epochs, batch size and learning rate;
4. the deployment's own concerns: torch threads and checkpoint steps;
5. the request: base model, output and work folders, examples, the task's system prompt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from adaptloop.errors import ConfigError

#: Every linear layer of a Llama block: the adapter learns a new output format quickly this way.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_LORA_RANK = 64
#: Where the bundled recipe YAMLs are (``TrainerSettings.recipes_dir`` names another folder).
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
#: Fields that say which data a run trains on and where its adapter goes: a recipe YAML's values for them are
#: for its command-line run; the service sets them per request.
RUN_FIELDS = ("model_path", "output_dir", "work_dir", "examples", "train_file", "generate_examples", "generate_seed",
              "task", "system_prompt")


@dataclass
class RecipeConfig:
    """The fields every recipe has. A subclass names its ``method`` and adds its own fields."""

    method: ClassVar[str] = ""

    model_path: str = field(default="", metadata={"help": "HF model folder of the base model; empty means the bundled SmolLM2-135M-Instruct."})
    output_dir: str = field(default="", metadata={
        "help": "Where the PEFT adapter folder is written (replaced if it exists); empty: /tmp/adaptloop-<method>."})
    work_dir: str = field(default="", metadata={
        "help": "Checkpoints go here (default: output_dir + '.work'); a run finding one there resumes from it."})
    examples: list[dict] = field(default_factory=list, metadata={
        "help": "Training examples in the recipe's shape (its class docstring); the service passes them in-process."})
    generate_examples: int = field(default=0, metadata={
        "help": "Without examples: this many generated order-extract cases (demo and smoke runs)."})
    generate_seed: int = field(default=7, metadata={"help": "Seed of the generated cases."})
    task: str = field(default="", metadata={"help": "Built-in task whose system prompt is used when system_prompt is empty."})
    system_prompt: str = field(default="", metadata={
        "help": "Prepended as the system message when an example's prompt has none (the TaskSpec's prompt)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r (vLLM's --max-lora-rank must be at least this)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES),
                                      metadata={"help": "Module names that get a LoRA pair; each must exist in the base."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (linear decay after warmup)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps spent warming up the learning rate."})
    epochs: float = field(default=1, metadata={
        "help": "Passes over the training examples (64 order-extract examples: 1 pass, ~0% -> ~95% holdout)."})
    batch_size: int = field(default=4, metadata={"help": "Examples per optimizer step."})
    max_length: int = field(default=1024, metadata={
        "help": "Tokens per example after the chat template (an episode's turns with their tools run to several "
                "hundred); longer ones are truncated."})
    seed: int = field(default=1234, metadata={"help": "Seed of Python, numpy, torch and the data order."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast: for GPUs and CPUs with native bf16; very slow on AVX2."})
    threads: int = field(default=1, metadata={
        "help": "torch intra-op threads; 0 means torch's default (all cores). On a busy 2-core machine 2 threads thrash."})
    logging_steps: int = field(default=2, metadata={"help": "Report loss every this many steps."})
    save_steps: int = field(default=4, metadata={"help": "Checkpoint every this many steps (0: never)."})

    #: The smallest batch the method can learn from (KTO's KL estimate needs two).
    min_batch_size: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.output_dir = self.output_dir or f"/tmp/adaptloop-{self.method}"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]):
        """``cls(**values)``, refusing unknown keys with the known ones listed (a typo must not pass silently)."""
        unknown = sorted(set(values) - field_names(cls))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(field_names(cls))}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: Sequence[str] = ()):
        """The config from a YAML file plus ``KEY=VALUE`` overrides (values parsed as YAML)."""
        import yaml

        values = read_yaml(path) if path else {}
        for item in overrides:
            key, _, raw = item.partition("=")
            values[key] = yaml.safe_load(raw)
        return cls.from_mapping(values)

    def validate(self) -> None:
        if not 1 <= self.lora_rank <= MAX_LORA_RANK:
            raise ConfigError(f"lora_rank must be in 1..{MAX_LORA_RANK}, got {self.lora_rank}")
        if self.epochs <= 0 or self.batch_size < self.min_batch_size or self.max_length < 16:
            raise ConfigError(f"{self.method} needs epochs > 0, batch_size >= {self.min_batch_size} and max_length >= 16")

    def resolved_system_prompt(self) -> str:
        """``system_prompt``, else the prompt of ``task`` in this process's catalogue (empty when neither is given)."""
        if self.system_prompt or not self.task:
            return self.system_prompt
        from adaptloop.tasks import load_catalogue

        return load_catalogue().get(self.task).system_prompt

    def public(self) -> dict[str, Any]:
        """The config without the examples: what lineage records (``config_json``)."""
        values = dataclasses.asdict(self)
        values.pop("examples", None)
        return values


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"recipe file {path}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"recipe file {path}: a mapping of fields expected, got {type(values).__name__}")
    return values
