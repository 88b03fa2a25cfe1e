"""``adaptloop``: one console script, one subcommand per process kind.

    adaptloop demo        # the whole loop on the embedded stack, before/after success printed
    adaptloop up | down   # start / stop the embedded stack (broker, curation, trainer, vLLM, gateway)
    adaptloop topics      # topics with message counts
    adaptloop report      # HTML + PNG report per (tenant, task) from the topics
    adaptloop loop-bench  # loop latency by stage, N-th admitted example -> adapter serving
    adaptloop tool-bench  # the tool-using task through the loop: episode success by cycle, loop latency
    adaptloop tool-offline  # the tool task's training recipe alone, on generated episodes: held-out success
    adaptloop streams     # a Faust curation worker
    adaptloop trainer     # the training service (Ray jobs)
    adaptloop serve       # vLLM with its registry sidecar
    adaptloop gateway     # the OpenAI-compatible gateway
    adaptloop canary      # the canary controller (promote / roll back on outcomes)
    adaptloop release     # manual promote / rollback of a release
    adaptloop keys        # gateway API keys (stored hashed)
    adaptloop tasks check FILE [--answers FILE]   # validate a task catalogue, judge sample answers

    adaptloop status      # live view: processes, topics and lag, counts by stage, releases, routing
    adaptloop lineage     # adapter -> dataset -> source offsets; interaction -> every adapter that used it
    adaptloop forget      # erase an interaction / session / subject; retrain or retire what learned from it
"""

from __future__ import annotations

import importlib
import sys

# Subcommand -> "module:function"; imported lazily so that `adaptloop streams` never imports torch.
COMMANDS = {
    "demo": ("adaptloop.ops.demo:main", "Run the whole loop on the embedded stack and print before/after."),
    "up": ("adaptloop.ops.stack:up_main", "Start the embedded stack on loopback."),
    "down": ("adaptloop.ops.stack:down_main", "Stop everything `up` started."),
    "topics": ("adaptloop.ops.stack:topics_main", "List topics with message counts."),
    "report": ("adaptloop.ops.report:main", "Write the HTML/PNG report per (tenant, task) from the topics."),
    "loop-bench": ("adaptloop.ops.loop_bench:main", "Measure loop latency by stage (N-th example -> adapter serving)."),
    "tool-bench": ("adaptloop.ops.tool_loop:main", "The tool-using task through the loop: episode success by cycle (JSON)."),
    "tool-offline": ("adaptloop.ops.tool_offline:main", "The tool task's training recipe alone: held-out episodes (JSON)."),
    "streams": ("adaptloop.streams.worker:main", "Run a Faust curation worker."),
    "trainer": ("adaptloop.trainers.service_loop:main", "Run the training service."),
    "serve": ("adaptloop.serving.server:main", "Run vLLM with the registry sidecar."),
    "gateway": ("adaptloop.serving.gateway:main", "Run the OpenAI-compatible gateway."),
    "canary": ("adaptloop.serving.canary:main", "Run the canary controller."),
    "release": ("adaptloop.serving.canary:release_main", "Promote or roll back a release by hand."),
    "keys": ("adaptloop.serving.keys:main", "Create gateway API keys."),
    "tasks": ("adaptloop.ops.tasks_check:main", "Check a task catalogue and judge sample answers with it."),

    "status": ("adaptloop.ops.status:main", "Show the stack: processes, topics, lag, counts by stage, releases."),
    "lineage": ("adaptloop.ops.lineage:main", "Trace an adapter to its data, or an interaction to its adapters."),
    "forget": ("adaptloop.ops.forget:main", "Erase data; retrain or retire every adapter that learned from it."),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: adaptloop COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"adaptloop: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function = COMMANDS[command][0].split(":")
    return int(getattr(importlib.import_module(module_name), function)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
