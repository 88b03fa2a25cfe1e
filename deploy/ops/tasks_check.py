"""``adaptloop tasks check FILE [--answers FILE]``: validate a task catalogue and judge sample answers with it.

    adaptloop tasks check my-tasks.yaml
    adaptloop tasks check my-tasks.yaml --answers answers.yaml    # {intent: [refund, {answer: x, reference: y}]}

Prints each task (validator kind, version, digest, its own settings) and, per sample answer, PASS or FAIL
with the validator's score and reason; exits 1 when the catalogue or the answers file is wrong.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from adaptloop.errors import ConfigError
from adaptloop.tasks import read_catalogue


@dataclass
class Answers:
    """Sample answers per task for ``adaptloop tasks check --answers``: [{answer, reference?}, ...]."""

    by_task: dict[str, list[dict[str, str | None]]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> "Answers":
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: answers are a mapping of task -> list of answers")
        by_task: dict[str, list[dict[str, str | None]]] = {}
        for task, items in raw.items():
            if not isinstance(items, list):
                raise ConfigError(f"{path}: answers of {task!r} are not a list")
            by_task[str(task)] = [{"answer": str(i), "reference": None} if not isinstance(i, dict) else
                                  {"answer": str(i.get("answer", "")),
                                   "reference": None if i.get("reference") is None else str(i["reference"])}
                                  for i in items]
        return cls(by_task)


def main(argv: list[str] | None = None) -> int:
    """``adaptloop tasks check FILE [--answers FILE]``: validate a catalogue and judge sample answers."""
    parser = argparse.ArgumentParser(prog="adaptloop tasks", description="Check a task catalogue.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a catalogue; with --answers, judge sample answers")
    check.add_argument("file", type=Path)
    check.add_argument("--answers", type=Path, help="YAML/JSON: {task: [answer | {answer, reference}, ...]}")
    args = parser.parse_args(argv)
    try:
        catalogue = read_catalogue(args.file)
        answers = Answers.read(args.answers) if args.answers else Answers()
    except ConfigError as exc:
        print(f"error: {exc}")
        return 1
    for name, spec in catalogue.tasks.items():
        extras = {k: getattr(spec, k) for k in ("window_size", "min_examples", "gate_margin", "max_new_tokens", "method", "epochs",
                                                 "batch_size", "learning_rate")
                  if getattr(spec, k) is not None}
        print(f"task {name}: {spec.kind} validator, version {spec.version}, digest {spec.digest[:19]}"
              + (f", {extras}" if extras else ""))
    unknown = sorted(set(answers.by_task) - set(catalogue.tasks))
    for task, items in answers.by_task.items():
        if task not in catalogue:
            continue
        for item in items:
            verdict = catalogue.get(task).judge(item["answer"], item["reference"])
            against = f" (reference {item['reference']!r})" if item["reference"] is not None else ""
            print(f"  {task}: {'PASS' if verdict.ok else 'FAIL'} {verdict.score:.2f} {item['answer'][:60]!r}{against}: "
                  f"{verdict.reason}")
    if unknown:
        print(f"error: answers name tasks the catalogue does not define: {unknown}")
        return 1
    print(f"ok: {len(catalogue)} tasks in {args.file}")
    return 0

