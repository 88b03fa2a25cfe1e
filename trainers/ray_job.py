"""Ray wraps the recipe: one Ray Train ``TorchTrainer`` run per training request.

Local Ray by default (``ray.init()`` on this machine); ``TrainerSettings.ray_address`` or the
``RAY_ADDRESS`` environment variable selects a cluster. The worker writes the adapter straight
into ``<artifact_dir>/<request_id>/adapter``, so on a cluster ``artifact_dir`` must be storage
that the workers and the trainer service share. Ray Train's own run state goes to
``<artifact_dir>/ray/<request_id>``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from adaptloop.errors import TrainingError
from adaptloop.settings import TrainerSettings
from adaptloop.trainers.sft import SFTRecipeConfig, SFTResult

log = logging.getLogger(__name__)

#: Object store of a local Ray: examples are small, and the machine is shared.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


def start_ray(settings: TrainerSettings) -> dict[str, Any]:
    """Connect to the configured cluster, or start a local Ray; return the cluster's resources."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = settings.ray_address or None  # None: RAY_ADDRESS if set, else a new local instance
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["object_store_memory"] = LOCAL_OBJECT_STORE_BYTES
    started = time.monotonic()
    ray.init(address=address, **kwargs)
    resources = ray.cluster_resources()
    log.info("ray up in %.1fs (%s): %s", time.monotonic() - started, address or os.environ.get("RAY_ADDRESS") or "local",
             {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")})
    return resources


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def recipe_config(settings: TrainerSettings, *, model_path: str, output_dir: Path, examples: list[dict],
                  system_prompt: str) -> SFTRecipeConfig:
    """The SFT recipe config for one request, from the trainer settings."""
    return SFTRecipeConfig(
        model_path=str(model_path),
        output_dir=str(output_dir),
        examples=examples,
        system_prompt=system_prompt,
        lora_rank=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        learning_rate=settings.learning_rate,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        seed=settings.seed,
        threads=settings.torch_threads,
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs inside the Ray Train worker: the recipe, with its progress reported to Ray and the log."""
    import ray.train

    from adaptloop.trainers import sft

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker_log = logging.getLogger("adaptloop.trainers.worker")
    cfg = sft.SFTRecipeConfig(**config["recipe"])
    request_id = config["request_id"]

    def progress(metrics: dict) -> None:
        if "loss" in metrics:
            worker_log.info("request %s step %s/%s epoch %.2f loss %.4f lr %.2e", request_id[:12], metrics["step"],
                            metrics["max_steps"], metrics.get("epoch", 0.0), metrics["loss"],
                            metrics.get("learning_rate", 0.0))

    result = sft.main(cfg, progress=progress)
    summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "log_history"}
    worker_log.info("request %s trained: %s", request_id[:12], summary)
    # Ray Train keeps the metrics of reports that carry a checkpoint: the adapter folder is it
    # (Ray copies it under storage_path; the service uses the folder in the artifact dir).
    ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(result.adapter_dir))


def train(settings: TrainerSettings, request_id: str, cfg: SFTRecipeConfig) -> SFTResult:
    """Run ``cfg`` as a one-worker Ray Train job named ``request_id``; return the recipe's result."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train V2 reroutes print() in workers to a logger even inside a redirect_stdout, so the
    # bytecode that `datasets` disassembles (through dill) to fingerprint functions floods the log.
    # The driver's RAY_TRAIN_* variables are propagated to the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    recipe = dataclasses.asdict(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"recipe": recipe, "request_id": request_id},
        # One worker with one CPU: torch threads come from the recipe (TrainerSettings.torch_threads).
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
        run_config=RunConfig(storage_path=str(Path(settings.artifact_dir).resolve() / "ray"), name=request_id),
    )
    started = time.monotonic()
    log.info("request %s: ray train job with %d examples", request_id[:12], len(cfg.examples))
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker failures in several types (TrainingFailedError, RayTaskError ...)
        raise TrainingError(f"ray train job {request_id} failed: {exc}") from exc
    metrics = dict(result.metrics or {})
    if "adapter_dir" not in metrics:
        raise TrainingError(f"ray train job {request_id} reported no result: {metrics}")
    log.info("request %s: ray job finished in %.1fs (train %.1fs, %s steps, loss %.4f)", request_id[:12],
             time.monotonic() - started, metrics["train_seconds"], metrics["steps"], metrics["final_loss"])
    return SFTResult(**{k: metrics[k] for k in ("adapter_dir", "train_examples", "steps", "train_loss",
                                                 "final_loss", "train_seconds")})
