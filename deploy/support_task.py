"""The example catalogue's tool-using task, ``support-agent``: a support agent with four tools over a generated
world of customers and orders, a deterministic environment that executes the tools, and judges of a turn
and of an episode. The catalogue (``deploy/tasks.yaml``) names them by import path, as a user's catalogue
names its own: nothing in the loop is special to this task.

An episode: the customer's message; the agent looks the order up (``lookup_order``), then refunds it
(``refund``, the amount from the lookup), changes its address (``change_address``), hands off to a person
(``handoff``), or only reports the status; then it answers in one sentence that names the order (and the
amount refunded). ``SupportCase.expected_turns`` is that trajectory; ``judge_episode`` compares an
agent's turns with it: right tools, right arguments, right final answer. ``replay_world`` is the task's
environment: the tools over the orders a recorded episode looked up, where the gate replays held-out episodes.

Held out by construction: ``SupportWorld(seed, held_out=True)`` draws other customers, other order-id
letters and other sentence templates than any training world.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from adaptloop.chat import TOOL_CALL_BLOCK, assistant_text
from adaptloop.validators import Verdict, turn_by_turn

TOOLS = [
    {"type": "function", "function": {"name": "lookup_order", "description": "Find an order by id.",
                                      "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}},
                                                     "required": ["order_id"]}}},
    {"type": "function", "function": {"name": "refund", "description": "Refund an order.",
                                      "parameters": {"type": "object", "properties": {
                                          "order_id": {"type": "string"}, "amount": {"type": "number"}},
                                          "required": ["order_id", "amount"]}}},
    {"type": "function", "function": {"name": "change_address", "description": "Ship an order elsewhere.",
                                      "parameters": {"type": "object", "properties": {
                                          "order_id": {"type": "string"}, "address": {"type": "string"}},
                                          "required": ["order_id", "address"]}}},
    {"type": "function", "function": {"name": "handoff_to_person", "description": "Pass the customer to a person.",
                                      "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}},
                                                     "required": ["order_id"]}}},
]
TOOL_NAMES = {t["function"]["name"] for t in TOOLS}
INTENTS = ("status", "refund", "address", "handoff")

#: The training world is wide, as a real shop's customers and catalogue are (an agent that memorised who bought
#: what would not generalise); the held-out world draws from lists that share nothing with it.
_NAMES = (["Alice", "Omar", "Mei", "Lars", "Priya", "Diego", "Hana", "Tomas", "Grace", "Yusuf", "Elena", "Bruno",
           "Chloe", "Rafael", "Ines", "Viktor", "Amara", "Felix", "Rosa", "Anil"],
          ["Aisha", "Jonas", "Sofia", "Kenji", "Nora", "Mateo", "Leila", "Ivan"])
_ITEMS = (["desk lamp", "coffee mug", "office chair", "backpack", "tea kettle", "water bottle", "desk fan", "notebook",
           "keyboard", "rain jacket", "lunch box", "floor rug", "wall clock", "bath towel", "garden hose"],
          ["yoga mat", "bike helmet", "table fan", "monitor arm", "phone case"])
_STREETS = (["Elm Street", "Harbor Road", "Mill Lane", "Park Avenue", "Oak Street", "River Road", "Church Lane",
             "Station Avenue", "Maple Drive", "Cedar Way"], ["Birch Way", "Quay Street", "Hill Road", "Lake Drive"])
_LETTERS = ("ABCDEFGH", "MNPRSTVW")
#: Each request names its intent with one cue word (status, refund, address, person) somewhere in free text,
#: as the ticket-triage task names its labels; the held-out side words everything else its own way.
_REQUESTS = ({
    "status": ["Hi, what is the status of my order {order}?", "{name} here: status of order {order}, please.",
               "Status of {order}?", "Can you tell me the status of order {order}? I ordered a {item}.",
               "What's the status on my {item}, order {order}?", "Order {order}: status please. Thanks, {name}",
               "Hello, I'm {name}. What is the status of {order}?", "Quick question about the status of order {order}.",
               "My {item} has not come yet. What is the status of order {order}?", "status {order}",
               "Could I get the status of order {order}?", "{name} once more. Order {order}, the {item}: status?"],
    "refund": ["Please refund order {order}, the {item} arrived broken.", "I want a refund for order {order}.",
               "Refund {order} please.", "{name} here, I'd like a refund on order {order}.",
               "The {item} in order {order} is the wrong size, can I get a refund?", "Order {order}: refund, please.",
               "Hello, I'm {name}. I would like a refund for {order}.", "I returned the {item}. Refund order {order}, please.",
               "refund {order}", "Can you refund {order}? The {item} never worked.",
               "Requesting a refund for order {order}. Thanks, {name}", "Order {order} was a mistake, I need a refund."],
    "address": ["Please change the address of order {order} to {address}.", "New address for order {order}: {address}.",
                "Ship {order} to this address instead: {address}.", "{name} here, my address changed, send order {order} to {address}.",
                "Can you update the address on {order}? It is {address} now.", "Order {order}, address: {address}, please.",
                "Hello, I'm {name}. Change the address of {order} to {address}.", "address {order}: {address}",
                "Wrong address on order {order}. The right one is {address}.", "Please use {address} as the new address of {order}.",
                "The {item} in order {order} should go to a new address: {address}.", "{name} here. New address {address} for order {order}."],
    "handoff": ["I need to talk to a person about order {order}.", "Can a person call me about order {order}? {name}",
                "Person please, about {order}.", "{name} here, I want a person to look at order {order}.",
                "I'd rather deal with a person, it's about the {item} in order {order}.", "Order {order}: get me a person.",
                "Hello, I'm {name}. Please have a person check order {order}.", "person {order}",
                "The {item} in order {order} is a long story, I need a person.", "A person should handle order {order}, please.",
                "Could you pass order {order} to a person? Thanks, {name}", "No bots please, a person for order {order}."],
}, {
    "status": ["Any status update on {order}? {name} asking.", "Could you check the status of {order} for me?",
               "Where is my {item}? Status of {order} would help."],
    "refund": ["The {item} from order {order} is useless, refund it please.", "{name} again: refund {order}, thanks.",
               "Money back for {order} please, I want a refund."],
    "address": ["I moved, so the address for {order} is now {address}.", "Address correction for {order}: {address}.",
                "Deliver {order} to a different address: {address}."],
    "handoff": ["Let me speak with a real person about {order}.", "{name} here, put me through to a person for {order}.",
                "Is there a person I could talk to? Order {order}."],
})


@dataclass(frozen=True)
class Order:
    order_id: str
    customer: str
    item: str
    total: float
    status: str


_ORDER_FIELDS = frozenset(Order.__dataclass_fields__)


@dataclass(frozen=True)
class SupportCase:
    """One customer message with the world it happens in and the trajectory that serves it."""

    request: str
    intent: str
    order: Order
    address: str = ""

    def expected_turns(self) -> list[dict[str, Any]]:
        """The assistant turns of a right episode: {"tool_calls": [...]} per tool turn, then {"content": ...}."""
        oid = self.order.order_id
        turns = [{"tool_calls": [call("lookup_order", order_id=oid)]}]
        if self.intent == "refund":
            turns.append({"tool_calls": [call("refund", order_id=oid, amount=self.order.total)]})
            # The amount as the lookup returned it (JSON's 140.4, not 140.40): the agent repeats what it read.
            turns.append({"content": f"I refunded {json.dumps(self.order.total)} for order {oid}."})
        elif self.intent == "address":
            turns.append({"tool_calls": [call("change_address", order_id=oid, address=self.address)]})
            turns.append({"content": f"Order {oid} now goes to {self.address}."})
        elif self.intent == "handoff":
            turns.append({"tool_calls": [call("handoff_to_person", order_id=oid)]})
            turns.append({"content": f"A colleague will contact you about order {oid}."})
        else:
            turns.append({"content": f"Order {oid} is {self.order.status}."})
        return turns


def call(name: str, **arguments: Any) -> dict[str, str]:
    return {"id": "", "name": name, "arguments": json.dumps(arguments)}


class SupportWorld:
    """Customers and orders from a seed, and the environment that executes the tools on them."""

    def __init__(self, seed: int, *, held_out: bool = False) -> None:
        self.random = random.Random(seed)
        self.side = int(held_out)
        self.orders: dict[str, Order] = {}

    def case(self) -> SupportCase:
        r, side = self.random, self.side
        name = f"{r.choice(_NAMES[side])} {r.choice(_NAMES[side])[0]}."
        oid = f"{r.choice(_LETTERS[side])}{r.randint(10000, 99999)}"
        order = Order(oid, name, r.choice(_ITEMS[side]), round(r.uniform(5, 200), 2),
                      r.choice(["shipped", "delivered", "in transit"]))
        self.orders[oid] = order
        intent = r.choice(INTENTS)
        address = f"{r.randint(1, 99)} {r.choice(_STREETS[side])}"
        request = r.choice(_REQUESTS[side][intent]).format(order=oid, name=name, item=order.item, address=address)
        return SupportCase(request, intent, order, address)

    def execute(self, name: str, arguments: Any) -> dict[str, Any]:
        """A tool's result, as the agent's runtime would return it."""
        if name not in TOOL_NAMES or not isinstance(arguments, dict):
            return {"error": f"unknown tool {name!r} or arguments not an object"}
        order = self.orders.get(str(arguments.get("order_id")))
        if order is None:
            return {"error": "no such order"}
        if name == "lookup_order":
            return {"order_id": order.order_id, "customer": order.customer, "item": order.item,
                    "total": order.total, "status": order.status}
        if name == "refund":
            return {"refunded": arguments.get("amount"), "order_id": order.order_id}
        if name == "change_address":
            return {"order_id": order.order_id, "address": arguments.get("address"), "ok": True}
        return {"order_id": order.order_id, "ticket": "human agent notified"}


# -- judges ---------------------------------------------------------------------------------------------

_FACT = re.compile(r"\b[A-Z]\d{5}\b|\b\d+\.\d+\b|\b\d{1,2} [A-Z][a-z]+ (?:Street|Road|Lane|Avenue|Way|Drive)\b")


def parse_turn(text: str) -> tuple[str, list[tuple[str, Any]]] | str:
    """(text outside the tool-call blocks, [(tool, arguments)]) of an assistant turn, or why it is not one."""
    calls = []
    for block in TOOL_CALL_BLOCK.findall(text):
        try:
            value = json.loads(block)
        except (ValueError, RecursionError):
            return "a tool call that is not JSON (or nested too deep)"
        if not isinstance(value, dict) or value.get("name") not in TOOL_NAMES or not isinstance(value.get("arguments"), dict):
            return f"a tool call of no known tool, or without object arguments: {block[:80]!r}"
        calls.append((value["name"], value["arguments"]))
    return TOOL_CALL_BLOCK.sub("", text).strip(), calls


def _same_arguments(got: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    if set(got) != set(want):
        return False
    return all(abs(float(got[k]) - float(v)) < 0.005 if isinstance(v, float) else str(got[k]).strip() == str(v).strip()
               for k, v in want.items() if not isinstance(got[k], (dict, list)))


def support_turn(response: str, reference: str | None = None) -> Verdict:
    """The catalogue's validator of one turn (``adaptloop.chat.assistant_text`` form). Alone: well-formed tool
    calls, or a non-empty answer. Against the right turn: the same tools with the same arguments, or an answer
    that names every order id, amount and address the right one names."""
    parsed = parse_turn(response)
    if isinstance(parsed, str):
        return Verdict(False, 0.0, parsed)
    text, calls = parsed
    if not calls and not text:
        return Verdict(False, 0.0, "empty turn")
    if reference is None:
        return Verdict(True, 1.0, "well-formed")
    want_text, want_calls = parse_turn(reference)
    if want_calls:
        if [name for name, _ in calls] != [name for name, _ in want_calls]:
            return Verdict(False, 0.0, f"tools {[n for n, _ in calls]} where {[n for n, _ in want_calls]} were right")
        wrong = [name for (name, got), (_, want) in zip(calls, want_calls) if not _same_arguments(got, want)]
        return Verdict(not wrong, 0.5 if wrong else 1.0, f"wrong arguments of {wrong}" if wrong else "right tool calls")
    if calls:
        return Verdict(False, 0.0, "tool calls where the answer was due")
    missing = [fact for fact in _FACT.findall(want_text) if fact not in text]
    return Verdict(not missing, 0.0 if missing else 1.0, f"the answer misses {missing}" if missing else "right answer")


def right_turns(case: SupportCase) -> list[str]:
    """The right episode's assistant turns as the judges read them (``adaptloop.chat.assistant_text``)."""
    return [assistant_text(t.get("content"), t.get("tool_calls") or ()) for t in case.expected_turns()]


def judge_episode(turns: Sequence[str], right: Sequence[str]) -> Verdict:
    """An episode's assistant turns against the right ones, turn by turn (the catalogue's episode judge)."""
    return turn_by_turn(support_turn, turns, right)


def replay_world(messages: Iterable[Mapping[str, Any]]) -> Callable[[str, Any], dict[str, Any]]:
    """The catalogue's environment: the tools executed over the orders an episode's record shows (what its
    ``lookup_order`` results returned), for the gate to replay the episode with another agent."""
    world = SupportWorld(0)
    for message in messages:
        if message.get("role") != "tool":
            continue
        try:
            found = json.loads(message.get("content") or "")
        except (ValueError, RecursionError):
            continue
        if isinstance(found, dict) and _ORDER_FIELDS <= found.keys():
            world.orders[str(found["order_id"])] = Order(**{k: found[k] for k in _ORDER_FIELDS})
    return world.execute


@dataclass
class EpisodeLog:
    """What an agent did in one episode: its turns, and the interaction id of each."""

    turns: list[dict[str, Any]] = field(default_factory=list)
    interaction_ids: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)


def _wire(calls: list[Mapping[str, Any]], turn: int) -> list[dict[str, Any]]:
    """Tool calls as an OpenAI assistant message carries them (an id for each, to pair with its result)."""
    return [{"id": c.get("id") or f"call_{turn}_{i}", "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for i, c in enumerate(calls)]


def tool_results(world: SupportWorld, calls: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``tool`` messages an agent's runtime sends back for wire-form calls, each executed in ``world``."""
    messages = []
    for c in calls:
        try:
            arguments = json.loads(c["function"]["arguments"])
        except ValueError:
            arguments = None
        messages.append({"role": "tool", "tool_call_id": c["id"],
                         "content": json.dumps(world.execute(c["function"]["name"], arguments))})
    return messages


def run_episode(client: Any, case: SupportCase, world: SupportWorld, *, model: str, episode_id: str,
                feedback: Any = None, takeover: bool | None = None, max_tokens: int = 64) -> tuple[Verdict, EpisodeLog]:
    """One episode through the gateway with the official OpenAI client (``client``): call, execute the tool calls
    against ``world``, send their results back, until the agent answers. With ``feedback`` (an
    ``adaptloop.sdk.FeedbackClient``) a reviewer judges every turn (a correction with the right tool calls
    when it was wrong), then the episode. With ``takeover`` (default: with feedback) a wrong turn is replaced by
    the right one and the episode goes on from a right history; without it a wrong turn ends the episode
    (the served agent on its own). ``EpisodeLog.verdicts`` has each turn's verdict."""
    takeover = feedback is not None if takeover is None else takeover
    messages: list[dict[str, Any]] = [{"role": "user", "content": case.request}]
    log = EpisodeLog()
    expected = case.expected_turns()
    for k, right in enumerate(expected, start=1):
        last = k == len(expected)
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=max_tokens,
            extra_headers={"x-adaptloop-episode": episode_id} | ({"x-adaptloop-episode-end": "true"} if last else {}))
        message = reply.choices[0].message
        turn = {"content": message.content or "", "tool_calls": [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]}
        log.turns.append(turn)
        log.interaction_ids.append(reply.id)
        verdict = support_turn(assistant_text(turn["content"], turn["tool_calls"]),
                               assistant_text(right.get("content"), right.get("tool_calls") or ()))
        log.verdicts.append(verdict)
        if feedback is not None:
            if verdict.ok:
                feedback.feedback(reply.id, source="HUMAN", success=True, labeler="support-lead")
            else:
                correction = {"role": "assistant", "content": right.get("content") or None,
                              "tool_calls": _wire(right.get("tool_calls") or [], k)}
                feedback.feedback(reply.id, source="HUMAN", success=False, correction=correction,
                                  labeler="support-lead", reason=verdict.reason[:4000])
        taken = turn if verdict.ok else (right if takeover else None)
        if taken is None or not taken.get("tool_calls"):
            break
        calls = _wire(taken["tool_calls"], k)
        messages.append({"role": "assistant", "content": taken.get("content") or None, "tool_calls": calls})
        messages += tool_results(world, calls)
    episode = judge_episode([assistant_text(t["content"], t["tool_calls"]) for t in log.turns], right_turns(case))
    if feedback is not None:
        feedback.feedback(episode_id=episode_id, source="BUSINESS", success=episode.ok, reason=episode.reason)
    return episode, log
