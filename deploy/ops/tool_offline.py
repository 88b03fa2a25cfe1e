"""``adaptloop tool-offline``: the tool task's training recipe alone, without the stack, as JSON.

    adaptloop tool-offline                                         # 36 episodes, the catalogue's training
    adaptloop tool-offline --episodes 30 --batch-size 4 --out four-per-step.json

Generates ``--episodes`` right trajectories of the example catalogue's ``support-agent`` (the per-turn
examples curation gives when a reviewer corrects and takes over every wrong turn), trains the SFT recipe
on them with the task's catalogue settings unless overridden (the same recipe the loop's trainer runs,
without Kafka or Ray), then replays held-out episodes with the adapter as the agent, as the gate does (another world: other
customers, order letters, items, streets and wording; transformers through the serving chat template). For choosing a task's training settings in minutes rather than a loop cycle.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from adaptloop.processes import cpu_name
from adaptloop.support_task import TOOLS, SupportWorld, _wire, tool_results
from adaptloop.tasks import example_catalogue

TASK = "support-agent"


def trajectories(episodes: int, seed: int = 7, *, held_out: bool = False) -> list[dict[str, Any]]:
    """One example per turn of ``episodes`` right episodes, each with the trajectory before it."""
    world, examples = SupportWorld(seed, held_out=held_out), []
    for n in range(episodes):
        case = world.case()
        messages: list[dict[str, Any]] = [{"role": "user", "content": case.request}]
        for k, right in enumerate(case.expected_turns(), start=1):
            examples.append({"prompt_messages": [dict(m) for m in messages], "completion": right.get("content") or "",
                             "completion_tool_calls": right.get("tool_calls") or [], "tools_json": json.dumps(TOOLS),
                             "episode_id": f"{'held-out' if held_out else 'train'}-{seed}-{n}", "turn": k})
            if right.get("tool_calls"):
                calls = _wire(right["tool_calls"], k)
                messages += [{"role": "assistant", "content": None, "tool_calls": calls}, *tool_results(world, calls)]
    return examples


def held_out_success(model_path: str, adapter_dir: str | None, *, episodes: int = 20, seed: int = 99,
                     threads: int = 2) -> tuple[float, list[str]]:
    """The agent on its own on held-out episodes, replayed as the gate replays them: (success, failure reasons)."""
    from adaptloop.trainers.evaluate import evaluate

    spec = example_catalogue().get(TASK)
    result = evaluate(spec, model_path, trajectories(episodes, seed, held_out=True), adapter_dir=adapter_dir,
                      max_new_tokens=spec.max_new_tokens or 64, threads=threads)
    return result.score, [failure["reason"] for failure in result.failures]


def main(argv: list[str] | None = None) -> int:
    from adaptloop.model import ensure_base_model
    from adaptloop.settings import DEFAULT_HOME
    from adaptloop.trainers import sft

    spec = example_catalogue().get(TASK)
    parser = argparse.ArgumentParser(prog="adaptloop tool-offline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=36, help="right training episodes (three turns at most each)")
    parser.add_argument("--epochs", type=float, default=spec.epochs or 1)
    parser.add_argument("--batch-size", type=int, default=spec.batch_size or 4)
    parser.add_argument("--learning-rate", type=float, default=spec.learning_rate or 2e-3)
    parser.add_argument("--held-out", type=int, default=20, help="held-out episodes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=DEFAULT_HOME / "tool-offline")
    parser.add_argument("--out", type=Path, default=Path("bench-tool-offline.json"))
    args = parser.parse_args(argv)
    model = str(ensure_base_model(DEFAULT_HOME))
    examples = trajectories(args.episodes)
    cfg = sft.SFTRecipeConfig(examples=examples, output_dir=str(args.work / "adapter"), epochs=args.epochs,
                              batch_size=args.batch_size, learning_rate=args.learning_rate, threads=args.threads,
                              max_length=1024, save_steps=0, system_prompt=spec.system_prompt)
    base, _ = held_out_success(model, None, episodes=args.held_out, threads=args.threads)
    started = time.monotonic()
    trained = sft.main(cfg)
    success, failures = held_out_success(model, cfg.output_dir, episodes=args.held_out, threads=args.threads)
    result = {"command": "adaptloop tool-offline " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": cpu_name(), "date": dt.date.today().isoformat(), "task": TASK,
              "episodes": args.episodes, "examples": len(examples), "epochs": args.epochs,
              "batch_size": args.batch_size, "learning_rate": args.learning_rate,
              "steps": trained.steps, "tokens": trained.tokens, "tokens_per_s": round(trained.tokens_per_s, 1),
              "train_s": round(time.monotonic() - started, 1), "held_out_episodes": args.held_out,
              "base_success": base, "success": success, "failures": Counter(failures).most_common(5)}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"held-out episode success: base {base:.0%} -> {success:.0%} ({args.episodes} episodes, {args.epochs:g} "
          f"epochs of {args.batch_size} per step, {trained.tokens_per_s:.0f} tokens/s); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
