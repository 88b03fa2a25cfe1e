"""The example catalogue's two tasks: their validators and the generators of cases with their truth.

``deploy/tasks.yaml`` (the catalogue shipped with adaptloop, which ``adaptloop demo`` and the tests
run on) names ``order_json`` and ``ticket_json`` by import path, as any user's catalogue names its
own Python validators. Nothing in the loop is special to them.

- ``order-extract``: an order sentence -> exact JSON with five fields (``OrderGenerator``);
- ``ticket-triage``: a support ticket -> ``{"category", "priority"}`` from closed sets
  (``TicketGenerator``). Each ticket names its area and its priority somewhere in free text, among
  other words; the 135M base model answers in prose (0% measured on 16 tickets), a LoRA trained on
  a few dozen corrected tickets learns to pick the two labels out into the exact JSON. (Tickets
  whose labels must be inferred from meaning alone -- "charged twice" -> billing -- were tried
  first: 32 examples taught the format but not the labels, 12% success.)

``case_generator(task, seed)`` returns the generator of one of them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

from adaptloop.errors import ConfigError
from adaptloop.validators import Verdict

ORDER_FIELDS = ("customer", "product", "quantity", "city", "deadline")

def _json_object(text: str, keys: tuple[str, ...]) -> dict | str:
    """The answer as a JSON object with exactly ``keys``, or why it is not one."""
    try:
        value = json.loads(text.strip())
    except ValueError as exc:
        return f"not JSON: {exc.msg}"
    if not isinstance(value, dict):
        return "not a JSON object"
    if sorted(value) != sorted(keys):
        return f"keys {sorted(value)} != {sorted(keys)}"
    return value


def _judge(parse: Callable[[str], dict | str], fields: tuple[str, ...], response: str, reference: str | None, *,
           what: str, normalize: Callable[[dict], dict] = dict) -> Verdict:
    """Form first (``parse``); with a reference, the share of ``fields`` whose values match."""
    parsed = parse(response)
    if isinstance(parsed, str):
        return Verdict(False, 0.0, parsed)
    if reference is None:
        return Verdict(True, 1.0, "well-formed")
    expected = parse(reference)
    if isinstance(expected, str):
        raise ConfigError(f"reference answer is not a valid {what}: {expected}")
    got, want = normalize(parsed), normalize(expected)
    wrong = [k for k in fields if got[k] != want[k]]
    if wrong:
        return Verdict(False, 1 - len(wrong) / len(fields), f"wrong fields: {wrong}")
    return Verdict(True, 1.0, "exact match")


def _parse_order(text: str) -> dict | str:
    value = _json_object(text, ORDER_FIELDS)
    if isinstance(value, str):
        return value
    if not isinstance(value["quantity"], int) or isinstance(value["quantity"], bool):
        return "quantity is not an integer"
    if not all(isinstance(value[k], str) and value[k].strip() for k in ORDER_FIELDS if k != "quantity"):
        return "a text field is empty or not a string"
    return value


def _normalized(order: dict) -> dict:
    return {k: (v.strip().casefold() if isinstance(v, str) else v) for k, v in order.items()}


def order_json(response: str, reference: str | None = None) -> Verdict:
    """Exact JSON with the five order fields; with a reference, the same values (case-insensitive)."""
    return _judge(_parse_order, ORDER_FIELDS, response, reference, what="order", normalize=_normalized)


TICKET_CATEGORIES = ("billing", "technical", "account", "shipping")
TICKET_PRIORITIES = ("low", "medium", "high")

TICKET_FIELDS = ("category", "priority")


def _parse_ticket(text: str) -> dict | str:
    value = _json_object(text, TICKET_FIELDS)
    if isinstance(value, str):
        return value
    if value["category"] not in TICKET_CATEGORIES:
        return f"category {value['category']!r} not in {list(TICKET_CATEGORIES)}"
    if value["priority"] not in TICKET_PRIORITIES:
        return f"priority {value['priority']!r} not in {list(TICKET_PRIORITIES)}"
    return value


def ticket_json(response: str, reference: str | None = None) -> Verdict:
    """JSON with exactly category and priority from their closed sets; with a reference, the same labels."""
    return _judge(_parse_ticket, TICKET_FIELDS, response, reference, what="triage")


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
class Case:
    """One generated input (``sentence``) with its truth; ``answer`` is the exact JSON expected."""

    sentence: str
    truth: dict

    @property
    def answer(self) -> str:
        return json.dumps(self.truth)


OrderCase = TicketCase = Case


class CaseGenerator:
    """Cases reproducible from a seed; a task's generator says how to make one (``case``)."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def case(self) -> Case:
        raise NotImplementedError

    def cases(self, n: int) -> list[Case]:
        return [self.case() for _ in range(n)]


class OrderGenerator(CaseGenerator):
    """Order sentences with their exact JSON."""

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


# -- ticket-triage cases ------------------------------------------------------------------------

_TICKET_ISSUES = {
    "billing": ["a billing question: I was charged twice for invoice {ref}", "billing: my refund for order {ref} never arrived",
                "the billing team sent invoice {ref} with the wrong VAT amount", "my card was billed after I cancelled, a billing error",
                "billing issue, the price on invoice {ref} does not match the quote", "for billing: I need a corrected receipt for payment {ref}"],
    "technical": ["a technical problem: the app crashes when I open the {thing} screen", "technical issue, error 500 when I upload to {thing}",
                  "the {thing} sync stopped working after the update (technical)", "technical: the export to CSV hangs at 99% in {thing}",
                  "a technical fault: the API times out for every request to {thing}", "technical trouble, the {thing} dashboard is blank"],
    "account": ["account access: I cannot reset my password for {thing}", "please change the e-mail address on my account",
                "my account is locked after too many login attempts", "account setup: I want to add a second admin to {thing}",
                "account security: two-factor codes stopped arriving", "please close the old account of {name}"],
    "shipping": ["shipping: parcel {ref} is stuck in transit since last week", "a shipping mistake, order {ref} went to the wrong address",
                 "shipping damage: package {ref} arrived broken", "shipping status for {ref} has not updated",
                 "order {ref} was marked delivered but the shipping never came", "shipping address change needed for order {ref}"],
}
_TICKET_URGENCY = {
    "high": ["High priority, please fix it today.", "This is high priority: our whole team is blocked!",
             "Priority high, we lose money every hour.", "High priority please, a customer demo starts in one hour."],
    "medium": ["Medium priority, please look into it this week.", "I would say medium priority, we can work around it.",
               "Could you check it in the next few days? Medium priority.", "Priority: medium. Let me know what you find."],
    "low": ["Low priority, whenever you have time.", "Just letting you know, low priority.",
            "Low priority, a small thing really.", "No rush at all, priority low. Thanks."],
}
_TICKET_OPENERS = ["Hello,", "Hi support,", "Dear team,", "Hey,", "Good morning,", ""]
_TICKET_THINGS = ["Reports", "Billing", "Projects", "Inbox", "Calendar", "Analytics", "Mobile", "Admin"]


class TicketGenerator(CaseGenerator):
    """Support tickets with their category and priority."""

    def case(self) -> TicketCase:
        r = self.random
        category, priority = r.choice(TICKET_CATEGORIES), r.choice(TICKET_PRIORITIES)
        issue = r.choice(_TICKET_ISSUES[category]).format(
            ref=f"{r.choice('ABCDEFGHJK')}{r.randint(10000, 99999)}", thing=r.choice(_TICKET_THINGS),
            name=f"{r.choice(_FIRST)} {r.choice(_LAST)}")
        signature = f"-- {r.choice(_FIRST)} {r.choice(_LAST)}"
        text = " ".join(part for part in (r.choice(_TICKET_OPENERS), issue[0].upper() + issue[1:] + ".",
                                          r.choice(_TICKET_URGENCY[priority]), signature) if part)
        return TicketCase(text, {"category": category, "priority": priority})


GENERATORS = {"order-extract": OrderGenerator, "ticket-triage": TicketGenerator}


def case_generator(task: str, seed: int) -> CaseGenerator:
    """The case generator of a built-in task (cases have ``.sentence`` and ``.answer``)."""
    try:
        return GENERATORS[task](seed)
    except KeyError:
        raise ConfigError(f"no case generator for task {task!r}; built in: {sorted(GENERATORS)}") from None
