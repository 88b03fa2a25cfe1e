"""The dedupe agent's body: exact hash and MinHash/LSH near duplicates per (tenant, task), decided once per example."""

from __future__ import annotations

from faust.types import EventT

from adaptloop.schemas import SerdeContext
from adaptloop.schemas.contract import reject_code_of
from adaptloop.streams import dedupe, stages
from adaptloop.streams.metrics import ADMITTED, ERASED, REJECTED
from adaptloop.streams.stages import SourceRef
from adaptloop.streams.state import stamped


class DedupeAgent:
    """Mixed into ``adaptloop.streams.curation.Curation``: uses its ``seen`` table, settings, metrics and sends."""

    def _index(self, tenant_task: str) -> dedupe.NearDuplicateIndex:
        index = self._indexes.get(tenant_task)
        if index is None:
            prefix = tenant_task + "/"
            admitted = sorted(((value.get("at") or 0, key[len(prefix):], value) for key, value in list(self.seen.items())
                               if key.startswith(prefix) and value["decision"]["admitted"]), key=lambda x: x[:2])
            index = dedupe.NearDuplicateIndex.of(((example_id, value["sig"], value["hash"])
                                                  for _, example_id, value in admitted),
                                                 self.settings.near_duplicate_threshold,
                                                 max_size=self.settings.dedupe_max_per_task)
            self._indexes[tenant_task] = index
        return index

    async def on_scored(self, event: EventT) -> None:
        ref = SourceRef(event.message.topic, event.message.partition, event.message.offset)
        example = self.curated_serde.deserialize(event.value, SerdeContext(ref.topic, ref.partition, ref.offset))
        tenant_task = stages.curated_key(example["tenant"], example["task"])
        if self.erased(example) is not None:
            self.metrics.record(stages.STAGE_DEDUPE, ERASED, tenant_task=tenant_task)
            return
        example["content_hash"] = dedupe.content_hash(example)
        if example["admitted"]:
            seen_key = f"{tenant_task}/{example['example_id']}"
            seen = self.seen.get(seen_key)
            if seen is None:  # first time: decide and keep the decision (a replay must decide the same)
                signature = dedupe.signature(example)
                index = self._index(tenant_task)
                decision = dedupe.dedupe_decision(example, exact_of=index.exact_of(example["content_hash"]),
                                                  near_of=index.query(signature, exclude=example["example_id"]))
                seen = stamped({"hash": example["content_hash"], "sig": signature, "decision": decision},
                               now=stages.now_ms(), partition=ref.partition)
                self.seen[seen_key] = seen
                if decision["admitted"]:
                    for evicted in index.add(example["example_id"], signature, example["content_hash"]):
                        if f"{tenant_task}/{evicted}" in self.seen:
                            del self.seen[f"{tenant_task}/{evicted}"]
            example.update(seen["decision"])
            if not example["admitted"]:
                self.metrics.record(stages.STAGE_DEDUPE, REJECTED, tenant_task=tenant_task,
                                    reason=reject_code_of(example) or "unknown")
        value = self.curated_serde.serialize(example, SerdeContext(self.curated.get_topic_name()))
        await self._send(self.curated, tenant_task, value)
        if example["admitted"]:
            self.metrics.record(stages.STAGE_DEDUPE, ADMITTED, tenant_task=tenant_task)
