"""Tasks and their validators.

A validator judges one answer: ``validator(response, reference=None) -> Verdict``. Without a
reference it checks the answer's form (what the stream can know); with one it also checks the
content (what evaluation on holdout examples knows). Validators are registered by name and
tasks name their validator, so a user adds a task without touching the pipeline.

The built-in task ``order-extract`` turns an order sentence into exact JSON with five fields;
``OrderGenerator`` makes such sentences with their truth, for the demo and the tests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable, Protocol

from adaptloop.errors import ConfigError


@dataclass(frozen=True)
class Verdict:
    ok: bool
    score: float
    reason: str


class Validator(Protocol):
    def __call__(self, response: str, reference: str | None = None) -> Verdict: ...


_VALIDATORS: dict[str, Validator] = {}


def register_validator(name: str) -> Callable[[Validator], Validator]:
    def decorate(fn: Validator) -> Validator:
        _VALIDATORS[name] = fn
        return fn
    return decorate


def validator(name: str) -> Validator:
    try:
        return _VALIDATORS[name]
    except KeyError:
        raise ConfigError(f"no validator {name!r}; registered: {sorted(_VALIDATORS)}") from None


@dataclass(frozen=True)
class TaskSpec:
    """What the loop needs to know of a task: how to judge it and how to ask for it."""

    name: str
    validator: str
    system_prompt: str
    version: str = "1"

    def judge(self, response: str, reference: str | None = None) -> Verdict:
        return validator(self.validator)(response, reference)

    @property
    def scorer(self) -> str:
        return f"{self.validator}@{self.version}"


ORDER_FIELDS = ("customer", "product", "quantity", "city", "deadline")

ORDER_SYSTEM_PROMPT = (
    "Extract the order from the user's sentence. Answer with JSON only, exactly these keys: "
    '"customer" (string), "product" (string), "quantity" (integer), "city" (string), '
    '"deadline" (string).'
)


def _parse_order(text: str) -> dict | str:
    try:
        value = json.loads(text.strip())
    except ValueError as exc:
        return f"not JSON: {exc.msg}"
    if not isinstance(value, dict):
        return "not a JSON object"
    if tuple(sorted(value)) != tuple(sorted(ORDER_FIELDS)):
        return f"keys {sorted(value)} != {sorted(ORDER_FIELDS)}"
    if not isinstance(value["quantity"], int) or isinstance(value["quantity"], bool):
        return "quantity is not an integer"
    if not all(isinstance(value[k], str) and value[k].strip() for k in ORDER_FIELDS if k != "quantity"):
        return "a text field is empty or not a string"
    return value


def _normalized(order: dict) -> dict:
    return {k: (v.strip().casefold() if isinstance(v, str) else v) for k, v in order.items()}


@register_validator("order_json")
def order_json(response: str, reference: str | None = None) -> Verdict:
    """Exact JSON with the five order fields; with a reference, the same values (case-insensitive)."""
    parsed = _parse_order(response)
    if isinstance(parsed, str):
        return Verdict(False, 0.0, parsed)
    if reference is None:
        return Verdict(True, 1.0, "well-formed")
    expected = _parse_order(reference)
    if isinstance(expected, str):
        raise ConfigError(f"reference answer is not a valid order: {expected}")
    wrong = [k for k in ORDER_FIELDS if _normalized(parsed)[k] != _normalized(expected)[k]]
    if wrong:
        return Verdict(False, 1 - len(wrong) / len(ORDER_FIELDS), f"wrong fields: {wrong}")
    return Verdict(True, 1.0, "exact match")


BUILTIN_TASKS = {
    "order-extract": TaskSpec("order-extract", "order_json", ORDER_SYSTEM_PROMPT),
}


def task_spec(name: str, tasks: dict[str, TaskSpec] | None = None) -> TaskSpec:
    catalogue = tasks or BUILTIN_TASKS
    try:
        return catalogue[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known: {sorted(catalogue)}") from None


_FIRST = ["Alice", "Omar", "Mei", "Lars", "Priya", "Diego", "Hana", "Tomas", "Aisha", "Jonas",
          "Sofia", "Kenji", "Nora", "Mateo", "Leila", "Ivan", "Chloe", "Ravi", "Elena", "Samuel"]
_LAST = ["Martin", "Haddad", "Chen", "Berg", "Sharma", "Lopez", "Sato", "Novak", "Okafor", "Weber",
         "Rossi", "Tanaka", "Dubois", "Silva", "Karimi", "Petrov", "Moreau", "Iyer", "Costa", "Klein"]
_PRODUCTS = ["desk lamp", "coffee mug", "USB cable", "office chair", "notebook", "water bottle",
             "wireless mouse", "standing desk", "phone case", "backpack", "monitor arm", "table fan",
             "yoga mat", "travel adapter", "bike helmet", "tea kettle"]
_CITIES = ["Lyon", "Oslo", "Porto", "Kyoto", "Austin", "Nairobi", "Gdansk", "Seville", "Leeds",
           "Turin", "Quebec", "Bergen", "Malaga", "Denver", "Hamburg", "Perth"]
_DEADLINES = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "next week",
              "end of month", "tomorrow", "March 3", "June 18", "October 9"]
_TEMPLATES = [
    "{customer} wants {quantity} x {product} delivered to {city} by {deadline}.",
    "Please ship {quantity} units of {product} to {city} for {customer}, due {deadline}.",
    "New order from {customer}: {product}, quantity {quantity}, destination {city}, deadline {deadline}.",
    "Can you send {quantity} pieces of {product} to {customer} in {city}? Needed by {deadline}.",
    "Deliver to {city} by {deadline}: {quantity} x {product}, ordered by {customer}.",
    "{customer} from {city} ordered {quantity} of the {product}; it must arrive {deadline}.",
]


@dataclass(frozen=True)
class OrderCase:
    sentence: str
    truth: dict

    @property
    def answer(self) -> str:
        return json.dumps(self.truth)


class OrderGenerator:
    """Order sentences with their exact JSON, reproducible from a seed."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def case(self) -> OrderCase:
        r = self.random
        truth = {
            "customer": f"{r.choice(_FIRST)} {r.choice(_LAST)}",
            "product": r.choice(_PRODUCTS),
            "quantity": r.randint(1, 40),
            "city": r.choice(_CITIES),
            "deadline": r.choice(_DEADLINES),
        }
        return OrderCase(r.choice(_TEMPLATES).format(**truth), truth)

    def cases(self, n: int) -> list[OrderCase]:
        return [self.case() for _ in range(n)]
