"""Episodes in curation: an outcome on a whole episode credits its trajectory.

The gateway and the SDK key every call of an episode, and every outcome on it, by the episode
(``adaptloop.sdk.episode_key``), so one partition sees the whole episode. An agent sends the whole history
on each call, so the episode's newest turn carries the trajectory: every earlier turn with its tool calls
and the tools' results in its request, its own answer in its response. The ``episodes`` table keeps, per
(tenant, episode), that newest turn (redacted, as every stored record is) and the episode-level outcomes.

An episode is curated ``outcome_grace_s`` after its first episode-level outcome arrived (a later turn or
a stronger outcome arriving meanwhile is taken), at once when the agent said the episode ended and a
human corrected it; the example is the newest turn with the winning outcome, ``scope=EPISODE``, and its
id is the turn's id + ``#episode`` (an outcome on one call of the episode gives that call's own example,
``scope=CALL``). Turns or outcomes arriving after the episode was curated are counted and logged, not
curated again. An episode-level outcome whose episode never shows a call within the outcome horizon is
dropped with the reason (``episode_without_calls``).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from adaptloop.streams import stages
from adaptloop.streams.delivery import after_delivery
from adaptloop.streams.metrics import REJECTED
from adaptloop.streams.state import ERASED_MARK, stamped

log = logging.getLogger(__name__)

EPISODE_SUFFIX = "#episode"


def table_key(tenant: str, episode_id: str) -> str:
    return f"{tenant}/{episode_id}"


def newer_turn(entry: Mapping[str, Any], record: Mapping[str, Any]) -> bool:
    """Whether ``record`` is a later turn than the one ``entry`` keeps (turn, then event time)."""
    last = (entry.get("last") or {}).get("record")
    if last is None:
        return True
    return (int(record.get("turn") or 0), int(record["event_time"])) >= (int(last.get("turn") or 0), int(last["event_time"]))


def as_episode_example(example: dict[str, Any]) -> dict[str, Any]:
    """A curated example of the episode's newest turn made the episode's: its own id and scope."""
    return example | {"example_id": example["example_id"] + EPISODE_SUFFIX, "scope": "EPISODE"}


class Episodes:
    """The join agent's episode half: newest turn per episode, episode-level outcomes, their grace, the emit."""

    def __init__(self, curation: Any, table: Any) -> None:
        self.curation = curation
        self.table = table
        # partition -> {table key: due ms}; rebuilt from the table after a rebalance.
        self._due: dict[int, dict[str, int]] | None = None
        self.in_flight: set[str] = set()  # being sent: the sweeper leaves them alone

    def note_turn(self, record: Mapping[str, Any], wrapped: Mapping[str, Any], partition: int) -> None:
        """An interaction of a named episode: keep it if it is the newest turn."""
        key = table_key(record["tenant"], record["episode_id"])
        entry = dict(self.table.get(key) or {})
        if entry.get("emitted"):
            log.info("episode %s: a turn after the episode was curated, ignored", key)
            return
        if newer_turn(entry, record):
            entry["last"] = dict(wrapped)
        entry["ended"] = bool(entry.get("ended")) or bool(record.get("episode_end"))
        self.table[key] = stamped(entry, now=stages.now_ms(), partition=partition)

    async def on_outcome(self, record: Mapping[str, Any], wrapped: Mapping[str, Any], partition: int) -> None:
        key = table_key(record["tenant"], record["episode_id"])
        entry = dict(self.table.get(key) or {})
        if entry.get("emitted") or key in self.in_flight:
            self.curation.metrics.record(stages.STAGE_JOIN, REJECTED, tenant_task=f"{record['tenant']}/?",
                                         reason="after_curated: the episode was already curated")
            return
        outcomes = list(entry.get("outcomes") or [])
        if any(o["record"]["outcome_id"] == record["outcome_id"] for o in outcomes):
            return
        entry["outcomes"] = outcomes + [dict(wrapped)]
        entry = stamped(entry, now=stages.now_ms(), partition=partition)
        entry.setdefault("first_outcome_ms", stages.now_ms())
        if entry.get("last") and entry.get("ended") and any(stages.is_final(o["record"]) for o in entry["outcomes"]):
            self.table[key] = entry
            await self.emit(key, entry)
            return
        if entry.get("due") is None:
            entry["due"] = stages.now_ms() + int(self.curation.settings.outcome_grace_s * 1000)
            if self._due is not None:
                self._due.setdefault(partition, {})[key] = entry["due"]
        self.table[key] = entry

    async def tick(self, partition: int, now: int) -> None:
        if self._due is None:
            self._due = {}
            for key, entry in list(self.table.items()):
                if isinstance(entry, dict) and entry.get("due") is not None and not entry.get("emitted"):
                    self._due.setdefault(int(entry["p"]), {})[key] = int(entry["due"])
        for key, due in sorted(self._due.get(partition, {}).items(), key=lambda item: item[1]):
            if due > now or key in self.in_flight:
                continue
            entry = dict(self.table.get(key) or {})
            if not entry or entry.get("emitted"):
                self._due[partition].pop(key, None)
                continue
            if not entry.get("last"):
                if now - int(entry.get("first_outcome_ms") or now) > self.curation.horizon_ms:
                    self.curation.metrics.record(stages.STAGE_JOIN, REJECTED, tenant_task=f"{key.split('/')[0]}/?",
                                                 reason="episode_without_calls: no call of the episode within the horizon")
                    self.table[key] = stamped({"emitted": "FAILURE"}, now=now, partition=int(entry["p"]))
                    self._due[partition].pop(key, None)
                continue  # its calls may still be on their way (an outbox, a slow agent)
            await self.emit(key, entry)

    def on_rebalance(self) -> None:
        self._due = None

    async def emit(self, key: str, entry: dict[str, Any]) -> None:
        """Curate the episode: its newest turn with the winning episode-level outcome, sent to dedupe."""
        curation = self.curation
        side = entry["last"]
        interaction = side["record"]
        self.in_flight.add(key)
        try:
            example = as_episode_example(curation.curate_sides(side, entry["outcomes"])[0])
            if curation.erased(example) is not None:
                self.table[key] = stamped({"emitted": ERASED_MARK}, now=stages.now_ms(), partition=int(entry["p"]))
                self.in_flight.discard(key)
                return
            await curation.send_scored(example)
        except BaseException:
            self.in_flight.discard(key)
            raise

        def emitted() -> None:  # once the broker has it: until then ``_in_flight`` keeps ticks off the episode
            self.table[key] = stamped({"emitted": example["kind"]}, now=stages.now_ms(), partition=int(entry["p"]))
            self.in_flight.discard(key)
            if self._due is not None:
                self._due.get(int(entry.get("p", -1)), {}).pop(key, None)
            log.info("episode %s curated from turn %s (%s)", key, interaction.get("turn"), example["kind"])

        after_delivery(emitted)
