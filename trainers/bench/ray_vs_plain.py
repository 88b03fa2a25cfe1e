"""Benchmark: LoRA training throughput and peak memory of our Ray job vs plain trl ``SFTTrainer``.

Same data (generated order-extract cases), same model, same recipe settings, same run:

* ``plain``: trl's ``SFTTrainer`` with a peft LoRA config in a fresh Python process (our SFT recipe is
  exactly that, ``adaptloop.trainers.sft.main``, started as ``python -m adaptloop.trainers.sft``);
* ``ray``: the same recipe on the trainer's Ray actor (``adaptloop.trainers.ray_job``), the path every
  training request takes, local Ray started here (its wall time includes the actor's start).

Prints tokens/s in the training loop, peak resident memory of the training process, wall time,
and ``ratio = ray tokens/s / plain tokens/s`` (target >= 0.95); and the floor: the machine's matmul rate,
measured here with the model's own shapes and thread count, over the FLOPs a LoRA step costs per token
(4 N: forward 2 N, backward 2 N for the activations' gradients; the frozen weights get none, LoRA's
own are a fraction of a percent), so ``floor_ratio = tokens/s / (rate / 4 N)`` says how far the loop
is from what the matmuls alone would allow. Writes everything as JSON.
Checkpointing is off in both so that the loop is compared, not the disk. Timings on a shared
machine are noisy: run it alone, and use ``--repeat`` to see the spread.

    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.bench.ray_vs_plain   # CPU, bundled SmolLM2-135M
    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.bench.ray_vs_plain --examples 64 --repeat 2 --out bench-trainer.json
    # GPU (untested here: no GPU machine on these runs): a larger HF model, bf16, MFU against the GPU's peak
    HF_HUB_OFFLINE=1 python -m adaptloop.trainers.bench.ray_vs_plain --model /models/Qwen2.5-1.5B-Instruct --gpu \\
        --bf16 --threads 0 --batch-size 8 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("adaptloop.trainers.bench.ray_vs_plain")

#: H100 SXM dense bf16 peak; pass --peak-tflops for another accelerator.
DEFAULT_PEAK_TFLOPS = 989.0


def model_parameters(model_dir: str) -> int:
    """Parameter count from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def mfu(tokens_per_s: float, parameters: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation with the usual 6 * N FLOPs per trained token (forward 2N + backward 4N;
    LoRA skips most weight gradients, so this overstates the work a little)."""
    return 6.0 * parameters * tokens_per_s / (peak_tflops * 1e12) if peak_tflops > 0 else 0.0


def matmul_rate(model_dir: str, threads: int, tokens: int, seconds: float = 3.0, gpu: bool = False) -> float:
    """FLOP/s of the model's largest matmul shape (tokens x hidden @ hidden x intermediate), fp32, measured."""
    import torch

    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inner = config["hidden_size"], config.get("intermediate_size", 4 * config["hidden_size"])
    if threads > 0:
        torch.set_num_threads(threads)
    device = "cuda" if gpu else "cpu"
    a, b = torch.randn(tokens, hidden, device=device), torch.randn(hidden, inner, device=device)
    for _ in range(3):
        a @ b
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
    if gpu:
        torch.cuda.synchronize()
    return 2.0 * tokens * hidden * inner * done / (time.perf_counter() - started)


def floor_tokens_per_s(rate_flops: float, parameters: int) -> float:
    """Tokens/s if a LoRA step cost only its matmuls (4 N FLOPs per token) at ``rate_flops``."""
    return rate_flops / (4.0 * parameters)


def recipe_overrides(args: argparse.Namespace, model: str, output_dir: str) -> dict[str, Any]:
    return {"model_path": model, "output_dir": output_dir, "task": "order-extract", "generate_examples": args.examples,
            "generate_seed": 7, "epochs": 1, "batch_size": args.batch_size, "max_length": args.max_length,
            "threads": args.threads, "bf16": args.bf16, "save_steps": 0, "seed": 1234}


def run_plain(args: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    """trl SFTTrainer + peft LoRA in a fresh process (its own peak memory); the recipe prints its summary."""
    overrides = recipe_overrides(args, model, str(work / "plain-adapter"))
    argv = [sys.executable, "-m", "adaptloop.trainers.sft"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout_s)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"plain trl run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    last = done.stdout.rfind("\n{")  # the recipe's JSON summary is the last thing it prints
    summary = json.loads(done.stdout[last + 1 if last >= 0 else done.stdout.index("{"):])
    return summary | {"wall_s": wall}


def run_ray(args: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    """The same recipe through our Ray job (local Ray, one actor), as the trainer service runs it."""
    import dataclasses

    from adaptloop.settings import TrainerSettings
    from adaptloop.trainers import ray_job
    from adaptloop.trainers.sft import SFTRecipeConfig

    settings = TrainerSettings(artifact_dir=work / "ray-artifacts", use_gpu=args.gpu)
    cfg = SFTRecipeConfig.from_mapping(recipe_overrides(args, model, str(work / "ray-adapter")))
    started = time.monotonic()
    ray_job.start_ray(settings)
    ray_up = time.monotonic() - started
    try:
        result = ray_job.train(settings, f"bench-{uuid.uuid4().hex[:8]}", "sft", cfg)
    finally:
        ray_job.stop_ray()
    summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "loss_curve"}
    return summary | {"wall_s": time.monotonic() - started, "ray_start_s": ray_up}


def main(argv: list[str] | None = None) -> int:
    from adaptloop.model import ensure_base_model
    from adaptloop.processes import cpu_name
    from adaptloop.settings import DEFAULT_HOME

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--examples", type=int, default=32, help="generated training examples")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs; very slow on CPUs without AMX/BF16)")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU (Ray: ScalingConfig(use_gpu=True))")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="accelerator peak for MFU")
    parser.add_argument("--repeat", type=int, default=1, help="alternate plain/ray this many times")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--out", default="bench-trainer.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = str(args.model or ensure_base_model(DEFAULT_HOME))
    parameters = model_parameters(model)
    # A batch's tokens (the generated order cases run ~150 tokens each), at the threads the recipe uses.
    rate = matmul_rate(model, args.threads, tokens=args.batch_size * 150, gpu=args.gpu)
    floor = floor_tokens_per_s(rate, parameters)
    log.info("matmul rate %.1f GFLOP/s (%d threads): floor %.0f tokens/s for %d parameters", rate / 1e9,
             args.threads, floor, parameters)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="adaptloop-bench-") as tmp:
        for i in range(args.repeat):
            work = Path(tmp) / f"run-{i}"
            plain = run_plain(args, model, work)
            ray = run_ray(args, model, work)
            runs.append({"plain": plain, "ray": ray, "ratio": ray["tokens_per_s"] / plain["tokens_per_s"],
                         "memory_ratio": ray["peak_rss_mb"] / plain["peak_rss_mb"]})
            log.info("run %d: plain %.0f tokens/s %.0f MB, ray %.0f tokens/s %.0f MB, ratio %.3f", i,
                     plain["tokens_per_s"], plain["peak_rss_mb"], ray["tokens_per_s"], ray["peak_rss_mb"], runs[-1]["ratio"])
    ratios = sorted(r["ratio"] for r in runs)
    report = {
        "model": model, "parameters": parameters, "examples": args.examples, "batch_size": args.batch_size,
        "max_length": args.max_length, "threads": args.threads, "gpu": args.gpu, "bf16": args.bf16,
        "runs": runs, "ratio_median": ratios[len(ratios) // 2], "target_ratio": 0.95,
        "matmul_gflops": round(rate / 1e9, 2), "floor_tokens_per_s": round(floor, 1),
        "floor_ratio": {kind: round(runs[-1][kind]["tokens_per_s"] / floor, 3) for kind in ("plain", "ray")},
        "command": "python -m adaptloop.trainers.bench.ray_vs_plain " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
        "mfu": {"plain": [mfu(r["plain"]["tokens_per_s"], parameters, args.peak_tflops) for r in runs],
                "ray": [mfu(r["ray"]["tokens_per_s"], parameters, args.peak_tflops) for r in runs],
                "peak_tflops": args.peak_tflops} if args.gpu else None,
        "note": "tokens/s inside the training loop (Ray start-up and model load excluded; wall_s includes them); "
                "peak_rss_mb of the process that trains",
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    last = runs[-1]
    print(f"plain trl SFTTrainer: {last['plain']['tokens_per_s']:.0f} tokens/s, peak {last['plain']['peak_rss_mb']:.0f} MB, "
          f"wall {last['plain']['wall_s']:.0f}s")
    print(f"ray job (actor): {last['ray']['tokens_per_s']:.0f} tokens/s, peak {last['ray']['peak_rss_mb']:.0f} MB, "
          f"wall {last['ray']['wall_s']:.0f}s (ray start {last['ray']['ray_start_s']:.0f}s)")
    print(f"floor: matmul {report['matmul_gflops']} GFLOP/s / 4N FLOPs per token = {floor:.0f} tokens/s; "
          f"plain at {report['floor_ratio']['plain']:.0%} of it, ray at {report['floor_ratio']['ray']:.0%}")
    print(f"ratio ray/plain tokens/s: median {report['ratio_median']:.3f} over {len(runs)} run(s) "
          f"(target >= 0.95); memory ratio {last['memory_ratio']:.2f}; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
