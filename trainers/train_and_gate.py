"""The train-and-gate step of the trainer service: train the planned adapter as a Ray job, evaluate it,
the incumbent and the regression suite on their holdouts, decide (``adaptloop.trainers.gate``) and
publish the release with its evidence.

``TrainerService`` (``adaptloop.trainers.service``) takes these methods from ``TrainAndGate``; they use
its settings, catalogue and base model, and its ``reject``, ``release_record`` and ``publish``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

from adaptloop.errors import ArtifactError, ConfigError, TrainingError
from adaptloop.tasks import TaskSpec
from adaptloop.trainers.snapshot import Plan, Snapshot

log = logging.getLogger("adaptloop.trainer")


class TrainAndGate:
    """From a checked plan to a published release (a part of ``TrainerService``)."""

    def incumbent(self, releases: list[dict], tenant: str, task: str):
        """The adapter to beat, or the base; (incumbent, note) -- the note says why an adapter was passed over."""
        from adaptloop.artifacts import verify_digest
        from adaptloop.trainers import evaluate as ev

        incumbent = ev.newest_live_adapter(releases, tenant, task)
        if incumbent.artifact_uri is None:
            return incumbent, ""
        if incumbent.base_model_digest and incumbent.base_model_digest != self.base_digest:
            return ev.Incumbent(), (f"incumbent {incumbent.version} was trained on base {incumbent.base_model_digest}, "
                                    f"this trainer's base is {self.base_digest}: compared with the base instead")
        try:
            verify_digest(Path(incumbent.artifact_uri), incumbent.digest or "")
        except ArtifactError as exc:
            raise TrainingError(f"cannot compare with incumbent {incumbent.version}: {exc}") from exc
        return incumbent, ""

    def train_and_gate(self, request: Mapping[str, Any], spec: TaskSpec, snapshot: Snapshot, plan: Plan,
                       releases: list[dict], erasures: Any) -> dict:
        from adaptloop.trainers import evaluate as ev
        from adaptloop.trainers import ray_job
        from adaptloop.trainers.vllm_eval import target as vllm_target

        request_id, tenant, task = request["request_id"], request["tenant"], request["task"]
        started = time.monotonic()
        try:
            incumbent, note = self.incumbent(releases, tenant, task)
        except TrainingError as exc:
            return self.reject(request, str(exc), snapshot, plan=plan)
        request_dir = Path(self.settings.artifact_dir).resolve() / request_id
        request_dir.mkdir(parents=True, exist_ok=True)
        cfg = ray_job.recipe_config(self.settings, plan.method, model_path=str(self.base_model),
                                    output_dir=request_dir / "adapter", work_dir=request_dir / "checkpoints",
                                    examples=plan.examples, system_prompt=spec.system_prompt, spec=spec)
        ray_job.start_ray(self.settings)
        max_new_tokens = spec.max_new_tokens or self.settings.max_new_tokens
        # The incumbent's answers do not depend on the candidate: they are worked out while it trains, on a core
        # the training leaves (torch_threads of the machine's) or on the vLLM server. The tag keeps its shadows
        # apart from the candidate's (each evaluation unloads its own tag's leftovers).
        with ThreadPoolExecutor(1, thread_name_prefix="incumbent-eval") as beside:
            incumbent_eval = beside.submit(
                ev.evaluate_many, self.base_model, [ev.EvalJob(spec, snapshot.holdout, incumbent.version,
                                                               incumbent.artifact_uri)],
                max_new_tokens=max_new_tokens, threads=1, vllm=vllm_target(self.settings), tag=f"incumbent-{request_id}")
            # The actor keeps the candidate in memory until the gate is done with it: no second load to evaluate it.
            with ray_job.training_run(self.settings, request_id) as run:
                try:
                    result = run.train(plan.method, cfg, hold=True)
                except BaseException:
                    incumbent_eval.cancel()
                    raise
                return self._gate(request, spec, snapshot, plan, releases, erasures, incumbent, note, cfg, result,
                                  incumbent_eval, max_new_tokens, started, run.completer(max_new_tokens))

    def _gate(self, request, spec, snapshot, plan, releases, erasures, incumbent, note, cfg, result, incumbent_eval,
              max_new_tokens, started, trained_complete) -> dict:
        """Check the trained adapter, evaluate it (and the regression suite: ``trained_complete`` answers as the
        candidate, on its actor, unless vLLM does), take the incumbent's evaluation that ran beside the training,
        decide and publish."""
        from adaptloop.artifacts import adapter_version, artifact_digest
        from adaptloop.trainers import evaluate as ev
        from adaptloop.trainers.gate import decide, regression_result, wilson_interval
        from adaptloop.trainers.release import ReleaseCheckError, check_adapter
        from adaptloop.trainers.vllm_eval import target as vllm_target

        request_id, tenant, task = request["request_id"], request["tenant"], request["task"]
        training = dataclasses.asdict(result) | {"plan": plan.reason, "signal": plan.counts}
        training.pop("adapter_dir")

        adapter_dir = Path(result.adapter_dir)
        digest = artifact_digest(adapter_dir)
        version = adapter_version(tenant, task, digest)
        try:
            adapter_config = check_adapter(adapter_dir, max_lora_rank=self.settings.max_lora_rank,
                                           base_dir=self.base_model)
        except ReleaseCheckError as exc:
            return self.reject(request, str(exc), snapshot, plan=plan, version=version, artifact=(adapter_dir, digest),
                               training=training, lora_rank=cfg.lora_rank)
        suite_sources, skipped = self.regression_holdouts(releases, tenant, task, snapshot, erasures)
        candidate, *suite_scores = ev.evaluate_many(self.base_model, [
            ev.EvalJob(spec, snapshot.holdout, version, adapter_dir),
            *(ev.EvalJob(source_spec, holdout, f"suite:{release['version']}", adapter_dir)
              for release, source_spec, holdout in suite_sources),
        ], max_new_tokens=max_new_tokens, threads=self.settings.torch_threads, vllm=vllm_target(self.settings),
            tag=request_id, loaded=trained_complete)
        [current] = incumbent_eval.result()
        suite = [regression_result(task=release["task"], source_version=release["version"], holdout_count=scored.count,
                                   candidate_score=scored.score, bar=float(release["evaluation"]["candidate_score"]),
                                   tolerance=self.settings.regression_tolerance)
                 for (release, _, _), scored in zip(suite_sources, suite_scores)]
        margin = spec.gate_margin if spec.gate_margin is not None else self.settings.gate_margin
        decision = decide(candidate=dataclasses.asdict(candidate), incumbent=dataclasses.asdict(current),
                          margin=margin, suite=suite, tolerance=self.settings.regression_tolerance,
                          confidence=self.settings.gate_confidence, canary_share=self.settings.canary_share)
        reason = (f"{decision.reason}; {plan.method} ({plan.reason}), {result.steps} steps in "
                  f"{result.train_seconds:.0f}s, final loss {result.final_loss:.4f}")
        ci, incumbent_ci = wilson_interval(candidate.passed, candidate.count), wilson_interval(current.passed, current.count)
        evidence = decision.evidence | {"suite_skipped": skipped, "incumbent_note": note} if note or skipped else decision.evidence
        evidence = evidence | {"engine": candidate.engine} | ({"engine_fallback": candidate.fallback} if candidate.fallback else {})
        release = self.release_record(
            request, state="RELEASED" if decision.passed else "REJECTED", reason=reason, version=version,
            artifact_uri=str(adapter_dir), digest=digest, snapshot=snapshot, method=plan.method,
            config=cfg.public(), lora_rank=int(adapter_config.get("r", cfg.lora_rank)),
            evaluation={"metric": f"{'episode_success' if candidate.unit == 'episode' else 'success_rate'}:{spec.scorer}",
                        "holdout_count": candidate.count,
                        "candidate_score": candidate.score, "incumbent": incumbent.version,
                        "incumbent_score": current.score, "margin": margin, "ci_low": ci[0], "ci_high": ci[1],
                        "incumbent_ci_low": incumbent_ci[0], "incumbent_ci_high": incumbent_ci[1],
                        "metrics": {"mean_validator_score": candidate.mean_score,
                                    "incumbent_mean_validator_score": current.mean_score}},
            regression=[s.record() for s in suite], evidence=evidence, training=training,
            parent_version=None if incumbent.version == ev.BASE else incumbent.version,
            canary_share=decision.canary_share)
        self.publish(release)
        log.info("request %s: %s %s in %.0fs: %s", request_id[:12], release["state"], version,
                 time.monotonic() - started, reason)
        return release

    def regression_holdouts(self, releases: list[dict], tenant: str, task: str, snapshot: Snapshot, erasures: Any):
        """The regression suite's sources: (release, its task, its holdout) for the tenant's newest earlier live
        releases (this task only, or any task with ``regression_scope=tenant``); the candidate's bar on each is
        the score that release recorded on its holdout. Also the releases skipped, with why."""
        from adaptloop.trainers import evaluate as ev
        from adaptloop.trainers.snapshot import read_snapshot

        sources, skipped, seen = [], [], {snapshot.uri}
        for release in reversed(ev.live_releases(releases, tenant)):
            if len(sources) >= self.settings.regression_max_suites:
                break
            uri = release["lineage"].get("dataset_uri") or ""
            if not uri or uri in seen or (self.settings.regression_scope == "task" and release["task"] != task):
                continue
            seen.add(uri)
            try:
                spec = self.catalogue.get(release["task"])
                holdout = [h for h in read_snapshot(uri, splits=("holdout",)).holdout if erasures.match(h) is None]
            except (ConfigError, OSError, ValueError, KeyError) as exc:
                # On record, not fatal: an unknown task or an unreadable store must not block every release.
                skipped.append({"source_version": release["version"], "reason": f"{type(exc).__name__}: {exc}"})
                log.warning("regression suite: skipping %s: %s", release["version"], exc)
                continue
            if holdout:
                sources.append((release, spec, holdout))
        return sources, skipped
