"""The task catalogue: one YAML file that every process judging, training or routing reads the same way.

    ADAPTLOOP_TASKS_FILE=my-tasks.yaml adaptloop up       # every process: curation, trainer, gateway ...
    adaptloop tasks check my-tasks.yaml --answers answers.yaml

A catalogue names each task with its system prompt and its validator, and optionally its own loop
settings (unset ones fall back to the process's settings)::

    tasks:
      intent:
        system_prompt: Label the customer's message with one word: refund, cancel or other.
        validator: {kind: regex, pattern: "(refund|cancel|other)"}
        window_size: 24          # a training request per 24 new admitted TRAIN examples
        min_examples: 8          # ... and never on fewer (curation's age trigger, the trainer)
        gate_margin: 0.05        # the candidate beats the incumbent's holdout success by this much
        max_new_tokens: 8        # evaluation's answer length
        epochs: 3                # training: passes over each request's examples,
        batch_size: 1            # ... examples per optimizer step,
        learning_rate: 0.001     # ... and the peak learning rate
        method: auto             # auto | sft | kto | dpo
        version: "2"             # yours to bump; the content digest changes with any edit anyway
        tools: my_agent:TOOLS    # a tool-using task: its tool definitions, its judge of a whole episode,
        episode_judge: my_agent:judge_episode
        environment: my_agent:sandbox     # ... and where the gate replays a held-out episode's tool calls

Validator kinds: ``json_schema`` (``schema``: the answer is JSON valid under it; with a reference,
equal to it), ``regex`` (``pattern``: the whole answer matches; with a reference, the same answer,
normalized), ``exact`` (``expected``: one of these, normalized; with a reference, that one) and
``python`` (``function: "module:function"``, importable in every environment that runs a process,
called as ``function(response, reference=None)`` and returning a ``Verdict`` or a bool;
``@adaptloop.validator`` makes such a function always return a ``Verdict``).
A tool task's ``episode_judge(turns, right_turns)`` gets an episode's assistant turns and the right ones, each as
the validator sees a turn (its text, then a ``<tool_call>`` block per call), and returns a ``Verdict`` or a
bool; without one, an episode is right when every turn is. Its ``environment(messages)`` gets a held-out
episode's recorded conversation (tool results included) and returns ``execute(name, arguments)``, the result
of one tool call in that episode's world; with one, the gate replays held-out episodes: the candidate runs as
the agent from the episode's first message, its tool calls executed there (``adaptloop.trainers.replay``).
Normalized: casefolded, whitespace collapsed, surrounding quotes and a final period dropped.

Without ``ADAPTLOOP_TASKS_FILE`` (or ``ADAPTLOOP_TASKS_INLINE``, the same YAML as text, for tests)
processes read the example catalogue shipped in ``deploy/tasks.yaml``. Unknown keys, bad patterns,
bad schemas and unimportable functions stop a process at start with the file, the line and the task.
Every task has a content ``digest``: a training request carries curation's, and the trainer refuses
a request whose task its own catalogue defines differently.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Mapping, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adaptloop.errors import ConfigError
# Verdict, Validator and validator are re-exported: a catalogue's user imports them from here too.
from adaptloop.validators import (Validator, Verdict, exact_validator, json_schema_validator, regex_validator,
                                  turn_by_turn, validator, verdict_of)

FILE_ENV = "ADAPTLOOP_TASKS_FILE"
INLINE_ENV = "ADAPTLOOP_TASKS_INLINE"
EXAMPLE_CATALOGUE = Path(__file__).with_name("tasks.yaml")
TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
METHODS = ("auto", "sft", "kto", "dpo")


@dataclass(frozen=True)
class TaskSpec:
    """What the loop knows of one task: how to ask for it, how to judge it, and its own loop settings."""

    name: str
    system_prompt: str
    validator: Validator
    kind: str
    version: str = "1"
    digest: str = ""
    window_size: int | None = None
    min_examples: int | None = None
    gate_margin: float | None = None
    max_new_tokens: int | None = None
    method: str | None = None
    epochs: float | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    #: A tool-using task's tool definitions (OpenAI's shape), its judge of a whole episode and the environment
    #: its held-out episodes replay in, if it has them.
    tools: tuple = ()
    episode_judge: Callable[..., Any] | None = None
    environment: Callable[..., Any] | None = None

    def judge(self, response: str, reference: str | None = None) -> Verdict:
        """The validator's verdict. A validator that fails on hostile content (a ``RecursionError`` on deep
        nesting, a user function's bug) gives a failed verdict naming the error: one answer never stops a
        stream or an evaluation."""
        return verdict_of("validator", self.validator, response, reference)

    def judge_episode(self, turns: Sequence[str], right_turns: Sequence[str]) -> Verdict:
        """An episode's assistant turns (each as ``judge`` sees a turn) against the right ones: the task's episode
        judge, or else every turn right by the validator, none missing."""
        if self.episode_judge is not None:
            return verdict_of("episode judge", self.episode_judge, list(turns), list(right_turns))
        return turn_by_turn(self.judge, turns, right_turns)

    @property
    def scorer(self) -> str:
        """Names the judge in curated examples and release records: kind, version and content digest."""
        return f"{self.kind}:{self.name}@{self.version}#{self.digest.partition(':')[2][:12]}"


@dataclass(frozen=True)
class Catalogue:
    """The tasks of one catalogue file, by name."""

    tasks: Mapping[str, TaskSpec]
    source: str

    def get(self, name: str) -> TaskSpec:
        try:
            return self.tasks[name]
        except KeyError:
            raise ConfigError(f"unknown task {name!r}; the catalogue {self.source} defines {sorted(self.tasks)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.tasks

    def __iter__(self) -> Iterator[str]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def digests(self) -> dict[str, str]:
        return {name: spec.digest for name, spec in self.tasks.items()}

    def disagreement(self, task: str, digest: str, *, theirs: str = "the request") -> str | None:
        """Why ``task`` as another process defined it (its ``digest``) is not this catalogue's, or None."""
        if not digest:
            return None  # a request from before catalogues carried digests: nothing to compare
        ours = self.tasks.get(task)
        if ours is None:
            return f"task {task!r} is in {theirs}'s catalogue but not in this one ({self.source})"
        if ours.digest != digest:
            return (f"task {task!r} differs between {theirs}'s catalogue (digest {digest[:19]}) and this one "
                    f"({self.source}: version {ours.version}, digest {ours.digest[:19]})")
        return None


# -- the file's shape ----------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class JsonSchemaValidator(_Strict):
    kind: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class RegexValidator(_Strict):
    kind: Literal["regex"]
    pattern: str = Field(min_length=1)


class ExactValidator(_Strict):
    kind: Literal["exact"]
    expected: list[str] = Field(default_factory=list)


class PythonValidator(_Strict):
    kind: Literal["python"]
    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


ValidatorEntry = Annotated[Union[JsonSchemaValidator, RegexValidator, ExactValidator, PythonValidator],
                           Field(discriminator="kind")]


class TaskEntry(_Strict):
    system_prompt: str = ""
    validator: ValidatorEntry
    version: str = "1"
    window_size: int | None = Field(None, ge=1)
    min_examples: int | None = Field(None, ge=1)
    gate_margin: float | None = Field(None, ge=0.0, le=1.0)
    max_new_tokens: int | None = Field(None, ge=1, le=8192)
    method: Literal["auto", "sft", "kto", "dpo"] | None = None
    epochs: float | None = Field(None, gt=0, le=100)
    batch_size: int | None = Field(None, ge=1, le=1024)
    learning_rate: float | None = Field(None, gt=0, le=1)
    tools: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    episode_judge: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    environment: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class CatalogueFile(_Strict):
    tasks: dict[str, TaskEntry] = Field(min_length=1)


def imported(path: str, what: str = "validator") -> Any:
    """The object at ``module:attribute``; ``ConfigError`` naming ``what`` it was for."""
    module_name, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {what} {path!r}: {exc}") from exc
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no {attribute!r} ({what} {path!r})") from None


def _callable(path: str, what: str) -> Callable[..., Any]:
    function = imported(path, what)
    if not callable(function):
        raise ConfigError(f"{what} {path!r} is not callable")
    return function


def python_validator(path: str) -> Validator:
    return _callable(path, "validator")


def _tools(path: str) -> tuple:
    tools = imported(path, "tools")
    tools = tools() if callable(tools) else tools
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) and "function" in t for t in tools):
        raise ConfigError(f"tools {path!r} are not a list of OpenAI tool definitions")
    return tuple(tools)


def _validator(entry: ValidatorEntry) -> Validator:
    if isinstance(entry, JsonSchemaValidator):
        return json_schema_validator(entry.schema_)
    if isinstance(entry, RegexValidator):
        return regex_validator(entry.pattern)
    if isinstance(entry, ExactValidator):
        return exact_validator(entry.expected)
    return python_validator(entry.function)


# -- loading ---------------------------------------------------------------------------------------

def _lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """(key path) -> 1-based line of every mapping key and sequence item in a composed YAML document."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            here = path + (key.value,)
            out[here] = key.start_mark.line + 1
            _lines(value, here, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            out[path + (i,)] = value.start_mark.line + 1
            _lines(value, path + (i,), out)
    return out


def _line_of(lines: Mapping[tuple, int], loc: tuple) -> int | None:
    """The line of the deepest part of ``loc`` (pydantic's error location) that the file holds."""
    keys = tuple(part for part in loc if part not in ("json_schema", "regex", "exact", "python"))
    for n in range(len(keys), 0, -1):
        if keys[:n] in lines:
            return lines[keys[:n]]
    return None


def _digest(name: str, entry: TaskEntry) -> str:
    canonical = json.dumps({"name": name, **entry.model_dump(by_alias=True)}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def parse_catalogue(text: str, source: str) -> Catalogue:
    """The catalogue in ``text`` (YAML or JSON); ``ConfigError`` naming ``source``, the line and the task."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: not YAML: {getattr(exc, 'problem', None) or exc}") from exc
    lines = _lines(node) if node is not None else {}
    try:
        parsed = CatalogueFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            line = _line_of(lines, loc)
            task = f" task {loc[1]!r}" if len(loc) > 1 and loc[0] == "tasks" else ""
            field_ = ".".join(str(p) for p in loc[2:]) or ".".join(str(p) for p in loc)
            problems.append(f"{source}:{line or 1}:{task} {field_}: {error['msg']}")
        raise ConfigError("bad task catalogue:\n  " + "\n  ".join(problems)) from None
    tasks: dict[str, TaskSpec] = {}
    for name, entry in parsed.tasks.items():
        where = f"{source}:{lines.get(('tasks', name), 1)}: task {name!r}"
        if not TASK_NAME.match(name):
            raise ConfigError(f"{where}: a task name is 1-63 of a-z, 0-9, '_', '.', '-', starting with a letter or digit")
        try:
            validator = _validator(entry.validator)
            tools = _tools(entry.tools) if entry.tools else ()
            episode_judge = _callable(entry.episode_judge, "episode judge") if entry.episode_judge else None
            environment = _callable(entry.environment, "environment") if entry.environment else None
        except ConfigError as exc:
            line = lines.get(("tasks", name, "validator"), lines.get(("tasks", name), 1))
            raise ConfigError(f"{source}:{line}: task {name!r}: {exc}") from exc
        tasks[name] = TaskSpec(name=name, system_prompt=entry.system_prompt, validator=validator,
                               kind=entry.validator.kind, version=entry.version, digest=_digest(name, entry),
                               window_size=entry.window_size, min_examples=entry.min_examples,
                               gate_margin=entry.gate_margin, max_new_tokens=entry.max_new_tokens,
                               method=entry.method, epochs=entry.epochs, batch_size=entry.batch_size,
                               learning_rate=entry.learning_rate, tools=tools, episode_judge=episode_judge,
                               environment=environment)
    return Catalogue(tasks, source)


def read_catalogue(path: str | Path) -> Catalogue:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the task catalogue {path}: {exc}") from exc
    return parse_catalogue(text, str(path))


def load_catalogue(environ: Mapping[str, str] | None = None) -> Catalogue:
    """The catalogue this process runs with: ``ADAPTLOOP_TASKS_INLINE`` (YAML text), else the file named by
    ``ADAPTLOOP_TASKS_FILE``, else the example catalogue shipped with adaptloop. Every process calls this."""
    environ = os.environ if environ is None else environ
    inline, path = environ.get(INLINE_ENV), environ.get(FILE_ENV)
    if inline and path:
        raise ConfigError(f"set {FILE_ENV} or {INLINE_ENV}, not both")
    if inline:
        return parse_catalogue(inline, f"${INLINE_ENV}")
    return read_catalogue(path or EXAMPLE_CATALOGUE)


def example_catalogue() -> Catalogue:
    """The catalogue shipped with adaptloop (the demo's tasks), whatever the environment says."""
    return read_catalogue(EXAMPLE_CATALOGUE)
