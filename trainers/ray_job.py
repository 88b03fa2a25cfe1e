"""Ray wraps the recipe: one Ray Train ``TorchTrainer`` run per training request.

Local Ray by default (``ray.init()`` on this machine); ``TrainerSettings.ray_address`` or the
``RAY_ADDRESS`` environment variable selects a cluster. The worker writes the adapter straight
into ``<artifact_dir>/<request_id>/adapter`` and its checkpoints into
``<artifact_dir>/<request_id>/checkpoints`` (every ``checkpoint_steps``), so on a cluster
``artifact_dir`` must be storage that the workers and the trainer service share. A job that was
killed (the service, the worker or the node) resumes from the newest checkpoint when the request
is replayed: it was not committed, so the service sees it again. Ray Train's own run state goes
to ``<artifact_dir>/ray/<request_id>``. Progress (step, loss, tokens/s) goes to the service log.

The whole trainer service can also run as a Ray Job on a cluster (it then trains there)::

    python -m adaptloop.trainers.ray_job submit --address http://HEAD:8265 -- --max-requests 1

which submits ``python -m adaptloop.cli trainer --max-requests 1`` with this package as its
working directory and the ``ADAPTLOOP_*`` variables of the caller as its environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from adaptloop.errors import ConfigError, TrainingError
from adaptloop.settings import TrainerSettings
from adaptloop.tasks import TaskSpec
from adaptloop.trainers.common import RecipeResult

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


#: method -> (module, config class): each recipe is a module with a config dataclass and main(cfg).
RECIPES = {
    "sft": ("adaptloop.trainers.sft", "SFTRecipeConfig"),
    "kto": ("adaptloop.trainers.kto", "KTORecipeConfig"),
    "dpo": ("adaptloop.trainers.dpo", "DPORecipeConfig"),
}


def recipe_class(method: str):
    import importlib

    if method not in RECIPES:
        raise TrainingError(f"no recipe for method {method!r}; known: {sorted(RECIPES)}")
    module_name, class_name = RECIPES[method]
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name)


def recipe_config(settings: TrainerSettings, method: str, *, spec: TaskSpec | None = None, **run: Any):
    """The recipe config of ``method`` for one request, in the layers ``adaptloop.trainers.config`` lists: ``spec``
    is the task's catalogue entry, ``run`` the request's model path, folders, examples and system prompt."""
    from adaptloop.trainers.config import RECIPES_DIR, RUN_FIELDS, field_names, read_yaml

    _, config_class = recipe_class(method)
    own = field_names(config_class)
    everyone = set().union(*(field_names(recipe_class(m)[1]) for m in RECIPES))
    unknown = sorted(set(settings.recipe) - everyone)
    if unknown:
        raise ConfigError(f"unknown recipe fields {unknown} in ADAPTLOOP_TRAINER_RECIPE; known: {sorted(everyone)}")
    path = Path(settings.recipes_dir or RECIPES_DIR) / f"{method}.yaml"
    values = {k: v for k, v in read_yaml(path).items() if k not in RUN_FIELDS}
    values |= {k: v for k, v in settings.recipe.items() if k in own}
    if spec is not None:
        values |= {k: v for k, v in (("epochs", spec.epochs), ("batch_size", spec.batch_size),
                                     ("learning_rate", spec.learning_rate)) if v}
    values |= {"threads": settings.torch_threads, "save_steps": settings.checkpoint_steps}
    values |= {k: str(v) if isinstance(v, Path) else v for k, v in run.items()}
    return config_class.from_mapping(values)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs inside the Ray Train worker: the recipe, with its progress reported to Ray and the log."""
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker_log = logging.getLogger("adaptloop.trainers.worker")
    module, config_class = recipe_class(config["method"])
    cfg = config_class(**config["recipe"])
    request_id = config["request_id"]

    def progress(metrics: dict) -> None:
        if "loss" in metrics:
            worker_log.info("request %s %s step %s/%s loss %.4f tokens/s %.0f lr %.2e", request_id[:12],
                            config["method"], metrics["step"], metrics["max_steps"], metrics["loss"],
                            metrics.get("tokens_per_s", 0.0), metrics.get("learning_rate", 0.0))

    result = module.main(cfg, progress=progress)
    summary = dataclasses.asdict(result)
    worker_log.info("request %s trained: %s", request_id[:12], {k: v for k, v in summary.items() if k != "loss_curve"})
    # Ray Train keeps the metrics of reports that carry a checkpoint: the adapter folder is it
    # (Ray copies it under storage_path; the service uses the folder in the artifact dir).
    ray.train.report({"result_json": json.dumps(summary)},
                     checkpoint=ray.train.Checkpoint.from_directory(result.adapter_dir))


def train(settings: TrainerSettings, request_id: str, method: str, cfg: Any) -> RecipeResult:
    """Run the ``method`` recipe with ``cfg`` as a one-worker Ray Train job named ``request_id``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train V2 reroutes print() in workers to a logger even inside a redirect_stdout, so the
    # bytecode that `datasets` disassembles (through dill) to fingerprint functions floods the log.
    # The driver's RAY_TRAIN_* variables are propagated to the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    recipe = dataclasses.asdict(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"recipe": recipe, "request_id": request_id, "method": method},
        # One worker with one CPU: torch threads come from the recipe (TrainerSettings.torch_threads).
        scaling_config=ScalingConfig(num_workers=1, use_gpu=settings.use_gpu),
        run_config=RunConfig(storage_path=str(Path(settings.artifact_dir).resolve() / "ray"), name=request_id),
    )
    started = time.monotonic()
    log.info("request %s: ray train job, %s on %d examples", request_id[:12], method, len(cfg.examples))
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker failures in several types (TrainingFailedError, RayTaskError ...)
        raise TrainingError(f"ray train job {request_id} failed: {exc}") from exc
    metrics = dict(result.metrics or {})
    if "result_json" not in metrics:
        raise TrainingError(f"ray train job {request_id} reported no result: {metrics}")
    summary = RecipeResult(**json.loads(metrics["result_json"]))
    log.info("request %s: ray job finished in %.1fs (train %.1fs, %s steps%s, loss %.4f, %.0f tokens/s)",
             request_id[:12], time.monotonic() - started, summary.train_seconds, summary.steps,
             f", resumed from step {summary.resumed_from_step}" if summary.resumed_from_step else "",
             summary.final_loss, summary.tokens_per_s)
    return summary


def submit(address: str, trainer_args: list[str], *, wait_s: float = 0.0) -> str:
    """Submit the trainer service as a Ray Job to the cluster at ``address``; return the job id.

    Untested here (no cluster on these machines); it uses Ray's own ``JobSubmissionClient``.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    import adaptloop

    client = JobSubmissionClient(address)
    env = {k: v for k, v in os.environ.items() if k.startswith(("ADAPTLOOP_", "HF_", "TRANSFORMERS_"))}
    entrypoint = " ".join(["python", "-m", "adaptloop.cli", "trainer", *map(shlex.quote, trainer_args)])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={
        "env_vars": env, "working_dir": str(Path(adaptloop.__file__).resolve().parent.parent)})
    log.info("submitted %s as ray job %s to %s", entrypoint, job_id, address)
    deadline = time.monotonic() + wait_s
    while wait_s and time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    return job_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ray helpers for the trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    job = sub.add_parser("submit", help="Submit the trainer service as a Ray Job.")
    job.add_argument("--address", default=os.environ.get("RAY_ADDRESS", ""), help="Ray dashboard address (http://HEAD:8265)")
    job.add_argument("--wait-s", type=float, default=0.0, help="wait this long for the job to finish")
    job.add_argument("trainer_args", nargs=argparse.REMAINDER, help="arguments of `adaptloop trainer` after --")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.address:
        parser.error("--address or RAY_ADDRESS is required")
    print(submit(args.address, [a for a in args.trainer_args if a != "--"], wait_s=args.wait_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
