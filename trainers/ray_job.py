"""Ray runs the recipe: each training request is one call on a warm Ray actor (``TrainingWorker``).

Local Ray by default (``ray.init()`` on this machine); ``TrainerSettings.ray_address`` or the
``RAY_ADDRESS`` environment variable selects a cluster. ``TrainerSettings.parallel_jobs`` actors are
started with the service (one CPU each, and a GPU each with ``use_gpu``) and kept between requests.
The actor writes the adapter straight into ``<artifact_dir>/<request_id>/adapter`` and its checkpoints
into ``<artifact_dir>/<request_id>/checkpoints`` (every ``checkpoint_steps``), so on a cluster
``artifact_dir`` must be storage that the actors and the trainer service share. A job that was
killed (the service, the actor or the node) resumes from the newest checkpoint when the request
is replayed: it was not committed, so the service sees it again. A job that outlives
``job_timeout_s`` is stopped with its actor (a new one takes its place). Progress (step, loss,
tokens/s) goes to the service log.

The whole trainer service can also run as a Ray Job on a cluster (it then trains there)::

    python -m adaptloop.trainers.ray_job submit --address http://HEAD:8265 -- --max-requests 1

which submits ``python -m adaptloop.cli trainer --max-requests 1`` with this package as its
working directory and the ``ADAPTLOOP_*`` variables of the caller as its environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import queue
import shlex
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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
    """Shut Ray down (its actors with it)."""
    global _workers
    import ray

    with _workers_lock:
        _workers = None
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


class TrainingWorker:
    """A Ray actor that runs recipes, one request at a time, and stays up between requests.

    A Ray Train ``TorchTrainer`` run per request started a controller and a worker group, imported torch,
    transformers and trl, and set up a process group for one worker: about 20 s of every job on 2 cores,
    against 20-50 s of training steps (the loop's latency; issue 26). A warm actor pays that once, when the
    service starts; checkpoints, resumption and the adapter folder are the recipe's own (the artifact dir)."""

    def __init__(self) -> None:
        import importlib

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for method in RECIPES:
            recipe_class(method)
        # The recipes import these when they run: here once, before the first request waits for them.
        for name in ("torch", "transformers", "peft", "datasets", "trl"):
            importlib.import_module(name)
        from trl import DPOTrainer, KTOTrainer, SFTTrainer  # noqa: F401  (trl imports each on first use)

        self._held: tuple[Any, Any] | None = None  # (model, tokenizer) of the last run, for its evaluation

    def run(self, method: str, recipe: dict[str, Any], request_id: str, hold: bool = False) -> dict[str, Any]:
        """Train; with ``hold``, keep the trained model in memory for ``complete`` until ``drop``."""
        from transformers import TrainerCallback

        worker_log = logging.getLogger("adaptloop.trainers.worker")
        module, config_class = recipe_class(method)
        self.drop()

        class KeepModel(TrainerCallback):
            model = None

            def on_train_end(self, args, state, control, model=None, **kwargs):
                self.model = model

        keeper = KeepModel()

        def progress(metrics: dict) -> None:
            if "loss" in metrics:
                worker_log.info("request %s %s step %s/%s loss %.4f tokens/s %.0f lr %.2e", request_id[:12], method,
                                metrics["step"], metrics["max_steps"], metrics["loss"],
                                metrics.get("tokens_per_s", 0.0), metrics.get("learning_rate", 0.0))

        try:
            summary = dataclasses.asdict(module.main(config_class(**recipe), callbacks=[keeper] if hold else (),
                                                     progress=progress))
            if keeper.model is not None:
                self._held = self._for_generation(keeper.model, recipe["model_path"])
        finally:
            keeper.model = None
            gc.collect()  # the optimizer and datasets of this request (and its model unless held)
        worker_log.info("request %s trained: %s", request_id[:12], {k: v for k, v in summary.items() if k != "loss_curve"})
        return summary

    @staticmethod
    def _for_generation(model: Any, model_path: str) -> tuple[Any, Any]:
        """The trained model with its adapter merged in place (as ``evaluate`` merges a loaded one), and the base's
        tokenizer as ``evaluate`` loads it."""
        from adaptloop.trainers.evaluate import eval_tokenizer

        model.eval()
        if hasattr(model, "merge_adapter"):
            model.merge_adapter()
        return model, eval_tokenizer(model_path)

    def complete(self, prompts: list, tools: list | None, max_new_tokens: int) -> list[str]:
        """Greedy completions by the model the last ``run`` held (``evaluate.completer_of``)."""
        from adaptloop.trainers.evaluate import completer_of

        if self._held is None:
            raise TrainingError("this actor holds no trained model")
        model, tokenizer = self._held
        return completer_of(model, tokenizer, max_new_tokens=max_new_tokens)(prompts, tools)

    def drop(self) -> None:
        if self._held is not None:
            self._held = None
            gc.collect()


_workers: queue.Queue | None = None
_workers_lock = threading.Lock()


def _new_worker(settings: TrainerSettings) -> Any:
    import ray

    return ray.remote(TrainingWorker).options(num_cpus=1, num_gpus=1 if settings.use_gpu else 0).remote()


def warm_workers(settings: TrainerSettings) -> queue.Queue:
    """The actors that train (``settings.parallel_jobs`` of them), started on first use; they start in the
    background, so calling this when the service starts has them ready when the first request comes."""
    global _workers
    with _workers_lock:
        if _workers is None:
            _workers = queue.Queue()
            for _ in range(settings.parallel_jobs):
                _workers.put(_new_worker(settings))
        return _workers


class TrainingRun:
    """A warm actor checked out for one request (``training_run``): ``train`` on it, then ``completer`` generates
    with the model it trained, still in its memory: the gate evaluates the candidate without loading it again
    (base, adapter and merge: 2 s of the loop's evaluation stage on 2 cores)."""

    def __init__(self, settings: TrainerSettings, request_id: str, worker: Any) -> None:
        self.settings, self.request_id, self.worker = settings, request_id, worker

    def _get(self, call: Any, what: str) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return ray.get(call, timeout=self.settings.job_timeout_s)
        except GetTimeoutError:
            ray.kill(self.worker)
            self.worker = _new_worker(self.settings)
            raise TrainingError(f"{what} {self.request_id} did not finish within {self.settings.job_timeout_s:.0f}s") from None
        except RayActorError as exc:  # the actor's process died (killed, out of memory): a new one for the next job
            self.worker = _new_worker(self.settings)
            raise TrainingError(f"{what} {self.request_id} failed: its actor died: {exc}") from exc
        except Exception as exc:  # the recipe raised (RayTaskError wraps it); the actor is fine
            raise TrainingError(f"{what} {self.request_id} failed: {exc}") from exc

    def train(self, method: str, cfg: Any, *, hold: bool = False) -> RecipeResult:
        """Run the ``method`` recipe with ``cfg``; with ``hold`` the actor keeps the trained model for ``completer``."""
        started = time.monotonic()
        log.info("request %s: ray job, %s on %d examples", self.request_id[:12], method, len(cfg.examples))
        summary = RecipeResult(**self._get(self.worker.run.remote(method, dataclasses.asdict(cfg), self.request_id,
                                                                  hold), "ray job"))
        log.info("request %s: ray job finished in %.1fs (train %.1fs, %s steps%s, loss %.4f, %.0f tokens/s)",
                 self.request_id[:12], time.monotonic() - started, summary.train_seconds, summary.steps,
                 f", resumed from step {summary.resumed_from_step}" if summary.resumed_from_step else "",
                 summary.final_loss, summary.tokens_per_s)
        return summary

    def completer(self, max_new_tokens: int):
        """``complete(prompts, tools)`` by the held model (``evaluate.evaluate_many``'s ``loaded``)."""
        def complete(prompts, tools=None) -> list[str]:
            return self._get(self.worker.complete.remote([list(p) for p in prompts],
                                                         list(tools) if tools is not None else None, max_new_tokens),
                             "evaluation on the training actor of")
        return complete


@contextmanager
def training_run(settings: TrainerSettings, request_id: str) -> Iterator[TrainingRun]:
    """A warm actor for ``request_id`` until the block ends; then it lets go of the model and goes back."""
    workers = warm_workers(settings)
    try:
        worker = workers.get(timeout=settings.job_timeout_s)
    except queue.Empty:
        raise TrainingError(f"request {request_id}: no free training actor within {settings.job_timeout_s:.0f}s") from None
    run = TrainingRun(settings, request_id, worker)
    try:
        yield run
    finally:
        run.worker.drop.remote()  # an actor runs its calls in order: dropped before its next job starts
        workers.put(run.worker)


def train(settings: TrainerSettings, request_id: str, method: str, cfg: Any) -> RecipeResult:
    """Run the ``method`` recipe with ``cfg`` for ``request_id`` on a warm Ray actor."""
    with training_run(settings, request_id) as run:
        return run.train(method, cfg)


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
