"""Recipe configs: one shared base, the recipe YAMLs, and the layers the trainer service builds a run's config from."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from adaptloop.errors import ConfigError
from adaptloop.settings import TrainerSettings
from adaptloop.tasks import parse_catalogue
from adaptloop.trainers.config import RECIPES_DIR, RecipeConfig
from adaptloop.trainers.dpo import DPORecipeConfig
from adaptloop.trainers.kto import KTORecipeConfig
from adaptloop.trainers.ray_job import RECIPES, recipe_config
from adaptloop.trainers.sft import SFTRecipeConfig

CATALOGUE = textwrap.dedent("""\
    tasks:
      mine:
        system_prompt: Answer in JSON.
        validator: {kind: regex, pattern: "x"}
        epochs: 3
        learning_rate: 0.0005
      plain:
        validator: {kind: regex, pattern: "x"}
""")
RUN = {"model_path": "m", "output_dir": Path("o"), "work_dir": Path("w"), "examples": [{"x": 1}],
       "system_prompt": "Answer in JSON."}


@pytest.fixture
def recipes_dir(tmp_path: Path) -> Path:
    (tmp_path / "kto.yaml").write_text("beta: 0.3\nepochs: 2\nlearning_rate: 0.004\nlora_rank: 8\n"
                                       "task: order-extract\ngenerate_examples: 48\noutput_dir: /tmp/x\n")
    (tmp_path / "dpo.yaml").write_text("sft_weight: 2.0\n")
    return tmp_path


def test_each_recipe_declares_only_its_own_fields():
    shared = {f.name for f in dataclasses.fields(RecipeConfig)}
    own = {c: {f.name for f in dataclasses.fields(c)} - shared for c in (SFTRecipeConfig, KTORecipeConfig, DPORecipeConfig)}
    assert own == {SFTRecipeConfig: {"train_file"}, KTORecipeConfig: {"beta", "desirable_weight", "undesirable_weight"},
                   DPORecipeConfig: {"beta", "sft_weight"}}
    assert (SFTRecipeConfig().output_dir, KTORecipeConfig().learning_rate, DPORecipeConfig().max_length) == (
        "/tmp/adaptloop-sft", 1e-3, 1024)


def test_a_yaml_value_reaches_the_config_the_service_trains_with(recipes_dir):
    spec = parse_catalogue(CATALOGUE, "t.yaml")
    cfg = recipe_config(TrainerSettings(recipes_dir=recipes_dir, torch_threads=3, checkpoint_steps=5), "kto",
                        spec=spec.get("plain"), **RUN)
    assert isinstance(cfg, KTORecipeConfig)
    assert (cfg.beta, cfg.epochs, cfg.learning_rate, cfg.lora_rank) == (0.3, 2, 0.004, 8)
    # The YAML's per-run fields are its command's: the service trains on the request's data, into its folders.
    assert (cfg.task, cfg.generate_examples, cfg.output_dir, cfg.examples) == ("", 0, "o", [{"x": 1}])
    assert (cfg.threads, cfg.save_steps) == (3, 5)  # the deployment's own concerns
    assert cfg.public()["beta"] == 0.3 and "examples" not in cfg.public()  # what lineage records


def test_the_catalogue_entry_overrides_the_yaml_and_the_deployment(recipes_dir):
    spec = parse_catalogue(CATALOGUE, "t.yaml").get("mine")
    settings = TrainerSettings(recipes_dir=recipes_dir, recipe={"epochs": 5, "beta": 0.2, "sft_weight": 0.5})
    kto = recipe_config(settings, "kto", spec=spec, **RUN)
    assert (kto.epochs, kto.learning_rate, kto.beta, kto.lora_rank) == (3, 0.0005, 0.2, 8)
    # A deployment value goes to each recipe that has the field (SFT has no beta), over the recipe's YAML.
    dpo = recipe_config(settings, "dpo", **RUN)
    assert (dpo.epochs, dpo.sft_weight, dpo.beta) == (5, 0.5, 0.2)
    assert recipe_config(TrainerSettings(recipe=settings.recipe), "sft", **RUN).epochs == 5
    with pytest.raises(ConfigError, match="betta"):
        recipe_config(TrainerSettings(recipe={"betta": 0.2}), "sft", **RUN)
    with pytest.raises(ConfigError, match="sft.yaml"):  # a folder named must hold every recipe it is asked for
        recipe_config(TrainerSettings(recipes_dir=recipes_dir), "sft", **RUN)


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_the_bundled_yamls_are_what_the_command_line_and_the_service_read(method):
    config_class = recipe_config(TrainerSettings(), method, **RUN).__class__
    cli = config_class.from_yaml(RECIPES_DIR / f"{method}.yaml", ["epochs=2"])
    assert (cli.task, cli.epochs, cli.output_dir) == ("order-extract", 2, f"/tmp/adaptloop-{method}")
    assert cli.generate_examples > 0
    cli.validate()


def test_the_system_prompt_is_the_given_one_else_the_tasks():
    from adaptloop.tasks import load_catalogue

    assert DPORecipeConfig(task="order-extract").resolved_system_prompt() == load_catalogue().get("order-extract").system_prompt
    assert DPORecipeConfig(task="order-extract", system_prompt="Mine.").resolved_system_prompt() == "Mine."
    assert DPORecipeConfig().resolved_system_prompt() == ""
