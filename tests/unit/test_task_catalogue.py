"""The task catalogue: the kinds of validator, the per-task settings, and errors that name file, line and task."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from adaptloop.errors import ConfigError
from adaptloop.tasks import EXAMPLE_CATALOGUE, example_catalogue, load_catalogue, parse_catalogue, read_catalogue

CATALOGUE = textwrap.dedent("""\
    tasks:
      ticket:
        validator:
          kind: json_schema
          schema: {type: object, required: [id], properties: {id: {type: integer}}}
      intent:
        system_prompt: One word, please.
        validator: {kind: regex, pattern: "(refund|cancel|other)"}
        window_size: 24
        min_examples: 4
        gate_margin: 0.1
        max_new_tokens: 8
        method: sft
        epochs: 3
        batch_size: 1
        learning_rate: 0.001
      capital:
        validator: {kind: exact, expected: [Paris, Rome]}
      orders:
        validator: {kind: python, function: "adaptloop.demo_tasks:order_json"}
""")


@pytest.fixture(scope="module")
def specs():
    return parse_catalogue(CATALOGUE, "tasks.yaml").tasks


@pytest.mark.parametrize("task, response, ok", [
    ("ticket", '{"id": 3}', True), ("ticket", '{"id": "3"}', False), ("ticket", "{}", False), ("ticket", "no", False),
    ("intent", "refund", True), ("intent", " cancel ", True), ("intent", "refund please", False),
    ("capital", '"paris."', True), ("capital", "Lyon", False),
    ("orders", "{}", False),
])
def test_verdicts(specs, task, response, ok):
    assert specs[task].judge(response).ok is ok, specs[task].judge(response)


def test_references_settings_and_scorer_names(specs):
    assert specs["capital"].judge("Rome", reference="rome").ok and not specs["capital"].judge("Rome", reference="Paris").ok
    assert specs["ticket"].scorer.startswith("json_schema:ticket@1#") and specs["ticket"].window_size is None
    assert "schema: 'id' is a required property" == specs["ticket"].judge("{}").reason
    intent = specs["intent"]
    assert (intent.window_size, intent.min_examples, intent.gate_margin, intent.max_new_tokens, intent.method,
            intent.epochs) == (24, 4, 0.1, 8, "sft", 3)
    assert intent.system_prompt == "One word, please."
    from pathlib import Path

    from adaptloop.settings import TrainerSettings
    from adaptloop.trainers.ray_job import recipe_config

    def training(spec):
        settings = TrainerSettings(recipe={"epochs": 1, "batch_size": 4, "learning_rate": 0.002})
        cfg = recipe_config(settings, "sft", model_path="m", output_dir=Path("o"), work_dir=Path("w"), examples=[],
                            system_prompt="", spec=spec)
        return cfg.epochs, cfg.batch_size, cfg.learning_rate
    assert training(intent) == (3, 1, 0.001) and training(specs["ticket"]) == (1, 4, 0.002)  # its own, else the trainer's


def test_the_digest_follows_the_content_not_the_file():
    one = parse_catalogue(CATALOGUE, "a.yaml").get("intent").digest
    assert one == parse_catalogue("# a comment\n" + CATALOGUE, "b.yaml").get("intent").digest
    changed = parse_catalogue(CATALOGUE.replace("cancel|other", "cancel|exchange|other"), "a.yaml")
    assert changed.get("intent").digest != one and changed.get("ticket").digest == parse_catalogue(
        CATALOGUE, "a.yaml").get("ticket").digest
    catalogue = parse_catalogue(CATALOGUE, "mine.yaml")
    assert catalogue.disagreement("intent", one) is None
    why = catalogue.disagreement("intent", changed.get("intent").digest, theirs="curation")
    assert "differs between curation's catalogue" in why and "mine.yaml" in why
    assert "not in this one" in catalogue.disagreement("other", "sha256:x")


@pytest.mark.parametrize("text, where, message", [
    ("tasks:\n  x:\n    validator: {kind: regex, pattern: a}\n    windw_size: 3\n", "t.yaml:4: task 'x'",
     "Extra inputs are not permitted"),
    ("tasks:\n  x:\n    validator: {kind: regex, pattern: \"(\"}\n", "t.yaml:3: task 'x'", "not a regex"),
    ("tasks:\n  x:\n    validator:\n      kind: json_schema\n      schema: {type: 5}\n", "t.yaml:3: task 'x'",
     "not a JSON schema"),
    ("tasks:\n  x:\n    validator: {kind: python, function: \"no_such_module:f\"}\n", "t.yaml:3: task 'x'",
     "cannot import 'no_such_module'"),
    ("tasks:\n  x:\n    validator: {kind: python, function: \"adaptloop.tasks:nope\"}\n", "t.yaml:3: task 'x'",
     "has no 'nope'"),
    ("tasks:\n  x:\n    validator: {kind: magic}\n", "t.yaml:3: task 'x'", "validator"),
    ("tasks:\n  x:\n    system_prompt: hi\n", "t.yaml:2: task 'x'", "validator: Field required"),
    ("tasks:\n  x:\n    validator: {kind: regex, pattern: a}\n    window_size: many\n", "t.yaml:4: task 'x'",
     "window_size"),
    ("tasks:\n  X Y:\n    validator: {kind: regex, pattern: a}\n", "t.yaml:2: task 'X Y'", "a task name is"),
    ("tasks: [\n", "t.yaml:2", "not YAML"),
    ("tasks: {}\n", "t.yaml:1", "tasks"),
])
def test_a_bad_catalogue_is_refused_with_file_line_and_task(text, where, message):
    with pytest.raises(ConfigError) as caught:
        parse_catalogue(text, "t.yaml")
    assert where in str(caught.value) and message in str(caught.value), str(caught.value)


def test_every_process_loads_the_same_way(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(CATALOGUE)
    assert sorted(load_catalogue({"ADAPTLOOP_TASKS_FILE": str(path)})) == ["capital", "intent", "orders", "ticket"]
    assert sorted(load_catalogue({"ADAPTLOOP_TASKS_INLINE": CATALOGUE})) == ["capital", "intent", "orders", "ticket"]
    assert load_catalogue({}).source == str(EXAMPLE_CATALOGUE) == example_catalogue().source
    with pytest.raises(ConfigError, match="not both"):
        load_catalogue({"ADAPTLOOP_TASKS_FILE": str(path), "ADAPTLOOP_TASKS_INLINE": CATALOGUE})
    with pytest.raises(ConfigError, match="cannot read"):
        read_catalogue(tmp_path / "absent.yaml")


def test_a_failing_validator_fails_the_answer_not_the_caller():
    specs = parse_catalogue(CATALOGUE, "t.yaml").tasks
    deep = "[" * 100_000 + "]" * 100_000
    for task in ("ticket", "orders"):
        verdict = specs[task].judge(deep)
        assert not verdict.ok
    assert "RecursionError" in specs["ticket"].judge(deep).reason or "not JSON" in specs["ticket"].judge(deep).reason


def test_tasks_check_prints_verdicts_and_exits_nonzero_on_errors(tmp_path):
    path, answers, bad = tmp_path / "tasks.yaml", tmp_path / "answers.yaml", tmp_path / "bad.yaml"
    path.write_text(CATALOGUE)
    answers.write_text("intent: [refund, 'maybe later', {answer: cancel, reference: refund}]\n")
    bad.write_text("tasks:\n  x:\n    validator: {kind: regex, pattern: \"(\"}\n")
    run = [sys.executable, "-m", "adaptloop.cli", "tasks", "check"]
    ok = subprocess.run(run + [str(path), "--answers", str(answers)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = [line for line in ok.stdout.splitlines() if line.startswith("  intent:")]
    assert [line.split()[1] for line in lines] == ["PASS", "FAIL", "FAIL"], ok.stdout
    assert "task intent: regex validator" in ok.stdout
    failed = subprocess.run(run + [str(bad)], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "bad.yaml:3: task 'x'" in failed.stdout and "not a regex" in failed.stdout
    shipped = subprocess.run(run + [str(EXAMPLE_CATALOGUE)], capture_output=True, text=True, timeout=60)
    assert shipped.returncode == 0 and "ok: 3 tasks" in shipped.stdout


@pytest.mark.parametrize("process", ["streams", "trainer", "gateway", "canary"])
@pytest.mark.parametrize("broken, message", [
    ("tasks:\n  intent:\n    validator: {kind: regex, pattern: a}\n    windw: 3\n", "windw"),
    ("tasks:\n  intent:\n    validator: {kind: regex, pattern: \"(\"}\n", "not a regex"),
    ("tasks:\n  intent:\n    validator:\n      kind: json_schema\n      schema: {type: 5}\n", "not a JSON schema"),
    ("tasks:\n  intent:\n    validator: {kind: python, function: \"my_missing_module:check\"}\n", "cannot import"),
])
def test_a_catalogue_error_stops_every_process_at_start(tmp_path, process, broken, message):
    from adaptloop.processes import adaptloop_command, streams_python

    path = tmp_path / "tasks.yaml"
    path.write_text(broken)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTLOOP_")} | {
        "ADAPTLOOP_TASKS_FILE": str(path), "ADAPTLOOP_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
        # Nothing listens here: a process that got past its catalogue would hang or fail on the broker instead.
        "ADAPTLOOP_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "ADAPTLOOP_KAFKA_EMBEDDED": "true"}
    command = adaptloop_command(process, python=streams_python() if process == "streams" else None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert f"{path}:" in done.stderr and "task 'intent'" in done.stderr and message in done.stderr, done.stderr[-2000:]
