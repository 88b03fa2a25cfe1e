"""Measure what ``adaptloop serve`` costs here: vLLM start-up, completion latency, adapter load.

    python -m adaptloop.serving.bench.startup                                  # as `adaptloop serve` runs vLLM
    python -m adaptloop.serving.bench.startup --adapter /path/to/peft-folder   # + runtime load and first use
    python -m adaptloop.serving.bench.startup --env VLLM_ENABLE_V1_MULTIPROCESSING=0   # compare a variant

Starts vLLM with exactly the flags of ``server.vllm_command`` (plus ``--env``), on a free port,
and always stops it. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from adaptloop.model import ensure_base_model
from adaptloop.processes import ManagedProcess
from adaptloop.serving.server import vllm_command, vllm_env, vllm_healthy
from adaptloop.settings import ServeSettings
from adaptloop.ops.stack import free_port

PROMPT = [{"role": "user", "content": "Name three colours."}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptloop.serving.bench.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5, help="12-token chat completions to time (default 5)")
    parser.add_argument("--adapter", type=Path, help="a peft LoRA folder to load at run time and use once")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for vLLM")
    args = parser.parse_args(argv)

    settings = ServeSettings(port=free_port())
    url = f"http://{settings.host}:{settings.port}"
    env = vllm_env(settings) | dict(item.split("=", 1) for item in args.env)
    log = Path(tempfile.mkdtemp(prefix="adaptloop-bench-")) / "vllm.log"
    vllm = ManagedProcess("vllm", vllm_command(settings, ensure_base_model(settings.home, settings.model.path)),
                          log, env=env)
    result: dict[str, object] = {"env": args.env, "log": str(log)}
    with httpx.Client(timeout=300) as http:
        started = time.monotonic()
        vllm.start()
        try:
            vllm.wait_ready(lambda: vllm_healthy(http, url), settings.startup_timeout_s)
            result["healthy_s"] = round(time.monotonic() - started, 2)
            result["completion_s"] = [round(_chat(http, url, settings.model.name), 3) for _ in range(args.requests)]
            if args.adapter:
                t0 = time.monotonic()
                http.post(url + "/v1/load_lora_adapter", json={"lora_name": "bench", "lora_path": str(args.adapter)}
                          ).raise_for_status()
                result["adapter_load_s"] = round(time.monotonic() - t0, 3)
                result["adapter_first_completion_s"] = round(_chat(http, url, "bench"), 3)
        finally:
            vllm.stop()
    print(json.dumps(result))
    return 0


def _chat(http: httpx.Client, url: str, model: str) -> float:
    t0 = time.monotonic()
    http.post(url + "/v1/chat/completions", json={"model": model, "messages": PROMPT, "max_tokens": 12,
                                                   "temperature": 0}).raise_for_status()
    return time.monotonic() - t0


if __name__ == "__main__":
    sys.exit(main())
