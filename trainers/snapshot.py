"""Dataset snapshots: each training request materialised into an immutable, content-addressed dataset.

    records (topic order) --last record per example_id--> this tenant/task --erasures out-->
    signal per example (desirable / undesirable / pair) --> train.parquet + holdout.parquet + manifest.json
    at <store>/datasets/<sha256 hex>/   (the store is any fsspec URL; a local folder by default)

The digest is the sha256 of the canonical JSON of the manifest (without the digest) and of the
rows, so the same request always gives the same digest and folder, and an erasure that removes
an example changes it. A snapshot folder is written once: data files first, the manifest last
(its presence means "complete"), and never changed: ``adaptloop forget`` (``adaptloop.ops.erasure_sweep``)
rewrites a snapshot that holds an erased example into a new one without it (``erase_rows``: a new
digest, ``rewritten_from`` in its manifest) and leaves at the old folder only ``rewritten.json``
(the erasure ids, the new digest, no content); ``read_snapshot`` follows it.

Which examples carry which signal:

* desirable: admitted SUCCESS and CORRECTION examples (the completion is right);
* pair: a CORRECTION whose ``rejected`` (the agent's original answer) is present and differs;
* undesirable: a FAILURE (never admitted) whose reject code is a verdict on the answer
  (``contract.VERDICT_CODES``: NOT_A_SUCCESS, RESPONSE_INVALID), with an answer; FAILUREs that are
  contract problems (a foreign tenant, a correction the validator refused) or near-duplicates say
  nothing about the answer and are left out.

A row keeps the reject code, not curation's ``reject_reason`` prose: rewording a reason changes
neither a snapshot's rows nor its digest.

Only desirable examples enter the holdout: evaluation needs a correct reference answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from adaptloop.schemas.contract import VERDICT_CODES, reject_code_of

SNAPSHOT_FORMAT = "adaptloop.snapshot/1"
MANIFEST = "manifest.json"
#: What an erasure leaves at a rewritten snapshot's folder: where its content went, none of the content.
REWRITTEN = "rewritten.json"
REWRITTEN_FORMAT = "adaptloop.snapshot-rewritten/1"
#: read_snapshot follows at most this many rewrites (one per erasure that hit the dataset).
MAX_REWRITES = 64
TRAIN_FILE, HOLDOUT_FILE = "train.parquet", "holdout.parquet"
DESIRABLE, UNDESIRABLE = "desirable", "undesirable"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _call(call: Mapping[str, Any]) -> dict[str, str]:
    return {"id": call["id"], "name": call["name"], "arguments": call["arguments"]}


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt message as a snapshot keeps it: text, an assistant's tool calls, a tool result's call id."""
    out: dict[str, Any] = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        out["tool_calls"] = [_call(c) for c in message["tool_calls"]]
    for key in ("tool_call_id", "name"):
        if message.get(key):
            out[key] = message[key]
    return out


def _row(record: Mapping[str, Any], partition: int, offset: int) -> dict:
    """The part of a CuratedExample a snapshot keeps (and its digest covers)."""
    return {
        "example_id": record["example_id"], "tenant": record["tenant"], "task": record["task"],
        "session_id": record.get("session_id", ""), "split": record["split"], "kind": record["kind"],
        "admitted": bool(record["admitted"]), "reject_code": reject_code_of(record),
        "prompt_messages": [_message(m) for m in record["prompt_messages"]],
        "completion": record["completion"], "rejected": record.get("rejected"),
        "completion_tool_calls": [_call(c) for c in record.get("completion_tool_calls") or ()],
        "rejected_tool_calls": [_call(c) for c in record.get("rejected_tool_calls") or ()],
        "tools_json": record.get("tools_json"), "episode_id": record.get("episode_id") or "",
        "turn": int(record.get("turn") or 0), "scope": record.get("scope") or "CALL",
        "score": float(record.get("score") or 0.0), "scorer": record.get("scorer", ""),
        "subjects": list(record.get("subjects") or []),
        "served_by": record.get("served_by"),
        "source_partition": int(partition), "source_offset": int(offset),
    }


def signal_of(record: Mapping[str, Any]) -> str | None:
    """DESIRABLE, UNDESIRABLE or None (no usable evidence); see the module docstring."""
    if record["admitted"] and record["kind"] in ("SUCCESS", "CORRECTION"):
        return DESIRABLE
    if (not record["admitted"] and record["kind"] == "FAILURE" and not record.get("near_duplicate_of")
            and turn_text(record).strip()
            and reject_code_of(record) in VERDICT_CODES):
        return UNDESIRABLE
    return None


def turn_text(row: Mapping[str, Any], side: str = "completion") -> str:
    """A row's completion (or its ``rejected`` original) as the model writes that turn: its text, then a
    ``<tool_call>`` block per call. What the preference recipes train on and the validator judges."""
    from adaptloop.chat import assistant_text

    return assistant_text(row.get(side) or "", row.get(f"{side}_tool_calls") or ())


def is_pair(row: Mapping[str, Any]) -> bool:
    """A correction that still carries the original answer (its text or its tool calls): a DPO pair."""
    rejected = turn_text(row, "rejected").strip()
    return row["kind"] == "CORRECTION" and bool(rejected) and rejected != turn_text(row).strip()


@dataclass(frozen=True)
class Snapshot:
    """One immutable dataset: its manifest (with the digest), its train and holdout rows."""

    manifest: dict
    train: list[dict]
    holdout: list[dict]
    uri: str = ""

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def train_ids(self) -> list[str]:
        return [r["example_id"] for r in self.train]

    def with_uri(self, uri: str) -> "Snapshot":
        return Snapshot(self.manifest, self.train, self.holdout, uri)


def _count(rows: Iterable[Mapping[str, Any]], key: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[key]] = counts.get(row[key], 0) + 1
    return dict(sorted(counts.items()))


def build_snapshot(positioned: Sequence[tuple[int, int, Mapping[str, Any]]], *, tenant: str, task: str,
                   ranges: Sequence[Mapping[str, Any]], erasures: Any = None) -> Snapshot:
    """The snapshot of ``positioned`` = [(partition, offset, CuratedExample)] for (tenant, task); pure.

    The LAST record per ``example_id`` by topic position wins (curation re-emits an example when a
    higher-precedence outcome arrives); ``erasures`` (an ``ErasureSet``) excludes an example if any of
    its records matches.
    """
    dropped = {"other_tenant_or_task": 0, "superseded": 0, "erased": 0, "no_signal": 0, "holdout_not_desirable": 0}
    latest: dict[str, tuple[int, int, Mapping[str, Any]]] = {}
    erased: dict[str, str] = {}
    for partition, offset, record in sorted(positioned, key=lambda item: (item[0], item[1])):
        if record["tenant"] != tenant or record["task"] != task:
            dropped["other_tenant_or_task"] += 1
            continue
        hit = erasures.match(record) if erasures is not None else None
        if hit is not None:
            erased[record["example_id"]] = hit["erasure_id"]
        if record["example_id"] in latest:
            dropped["superseded"] += 1
        latest[record["example_id"]] = (partition, offset, record)
    train, holdout = [], []
    for example_id in sorted(latest):
        if example_id in erased:
            dropped["erased"] += 1
            continue
        partition, offset, record = latest[example_id]
        signal = signal_of(record)
        if signal is None:
            dropped["no_signal"] += 1
            continue
        row = _row(record, partition, offset) | {"signal": signal}
        if record["split"] == "HOLDOUT":
            if signal != DESIRABLE:
                dropped["holdout_not_desirable"] += 1
                continue
            holdout.append(row)
        else:
            train.append(row)
    redactions: dict[str, int] = {}
    for _, _, record in latest.values():
        if record["example_id"] in erased:
            continue
        for redaction in record.get("redactions") or ():
            redactions[redaction["rule"]] = redactions.get(redaction["rule"], 0) + int(redaction["count"])
    manifest = {
        "format": SNAPSHOT_FORMAT,
        "tenant": tenant,
        "task": task,
        "source": [{"topic": r["topic"], "partition": r["partition"], "start_offset": r["start_offset"],
                    "end_offset": r["end_offset"]} for r in ranges],
        "records_read": len(positioned),
        "dropped": dropped,
        "redaction_rules": dict(sorted(redactions.items())),
        "erasures": {"excluded": dropped["erased"], "erasure_ids": sorted(set(erased.values()))},
        "files": {"train": TRAIN_FILE, "holdout": HOLDOUT_FILE},
    }
    return _sealed(manifest, train, holdout)


def _sealed(manifest: Mapping[str, Any], train: list[dict], holdout: list[dict]) -> Snapshot:
    """The snapshot of these rows: ``manifest`` with the rows' counts and scorers, and the digest over all three."""
    manifest = {k: v for k, v in manifest.items() if k != "digest"} | {
        "counts": {"train": _count(train, "kind"), "holdout": _count(holdout, "kind"),
                   "train_signal": {DESIRABLE: sum(r["signal"] == DESIRABLE for r in train),
                                    UNDESIRABLE: sum(r["signal"] == UNDESIRABLE for r in train),
                                    "pairs": sum(is_pair(r) for r in train)}},
        "scorers": sorted({r["scorer"] for r in train + holdout if r["scorer"]})}
    digest = hashlib.sha256("\n".join(canonical_json(part) for part in (manifest, train, holdout)).encode())
    return Snapshot({**manifest, "digest": "sha256:" + digest.hexdigest()}, train, holdout)


def erase_rows(snapshot: Snapshot, erasures: Any) -> tuple[Snapshot, dict[str, str]] | None:
    """``snapshot`` without the rows ``erasures`` (an ``ErasureSet``) matches, and {example_id: erasure_id} of
    those rows; None when it matches none. Pure. A row keeps what matching needs (example_id, tenant,
    session_id, subjects), so this drops exactly what ``build_snapshot`` would have dropped from its latest
    records. The new manifest counts the rows left, adds the erased ones to ``dropped`` and ``erasures``, and
    says in ``rewritten_from`` which digest it came from; ``redaction_rules`` still counts the rows it was
    built with (rows do not keep their redactions)."""
    erased: dict[str, str] = {}
    kept: dict[str, list[dict]] = {"train": [], "holdout": []}
    for split, rows in (("train", snapshot.train), ("holdout", snapshot.holdout)):
        for row in rows:
            hit = erasures.match(row)
            if hit is None:
                kept[split].append(row)
            else:
                erased[row["example_id"]] = hit["erasure_id"]
    if not erased:
        return None
    manifest = dict(snapshot.manifest)
    ids = sorted(set(erased.values()))
    manifest["dropped"] = dict(manifest["dropped"]) | {"erased": manifest["dropped"].get("erased", 0) + len(erased)}
    manifest["erasures"] = {"excluded": manifest["erasures"]["excluded"] + len(erased),
                            "erasure_ids": sorted(set(manifest["erasures"]["erasure_ids"]) | set(ids))}
    manifest["rewritten_from"] = [*manifest.get("rewritten_from", ()),
                                  {"digest": snapshot.digest, "erasure_ids": ids, "rows_removed": len(erased)}]
    return _sealed(manifest, kept["train"], kept["holdout"]), erased


# -- the store (fsspec) -------------------------------------------------------------------------------


def snapshot_uri(store: str, digest: str) -> str:
    return f"{store.rstrip('/')}/datasets/{digest.removeprefix('sha256:')}"


def _write_rows(fs, path: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # JSON-encode the nested columns: a column that is all-null or all-empty in one snapshot would
    # otherwise get a null type that another snapshot's reader cannot unify; the rows stay exact.
    table = pa.Table.from_pylist([{"row_json": canonical_json(r), "example_id": r["example_id"],
                                   "split": r["split"], "kind": r["kind"], "signal": r["signal"]} for r in rows],
                                 schema=pa.schema([("row_json", pa.string()), ("example_id", pa.string()),
                                                   ("split", pa.string()), ("kind", pa.string()),
                                                   ("signal", pa.string())]))
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def _read_rows(fs, path: str) -> list[dict]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return [json.loads(value) for value in pq.read_table(f, columns=["row_json"]).column("row_json").to_pylist()]


def write_snapshot(snapshot: Snapshot, store: str) -> Snapshot:
    """Write ``snapshot`` under ``store`` unless a complete one with its digest is there; return it with its URI."""
    import fsspec

    uri = snapshot_uri(store, snapshot.digest)
    fs, root = fsspec.core.url_to_fs(uri)
    if fs.exists(f"{root}/{MANIFEST}"):
        return snapshot.with_uri(uri)  # immutable: the same digest is the same content
    fs.makedirs(root, exist_ok=True)
    _write_rows(fs, f"{root}/{TRAIN_FILE}", snapshot.train)
    _write_rows(fs, f"{root}/{HOLDOUT_FILE}", snapshot.holdout)
    with fs.open(f"{root}/{MANIFEST}", "w") as f:
        f.write(json.dumps(snapshot.manifest, indent=1, sort_keys=True))
    return snapshot.with_uri(uri)


def read_snapshot(uri: str, *, splits: Sequence[str] = ("train", "holdout")) -> Snapshot:
    """A snapshot folder back: its manifest and the named splits (others come back empty).

    A snapshot an erasure rewrote is read where its ``rewritten.json`` points (as often as it was
    rewritten): the result's ``uri`` and digest are the rewritten snapshot's, and its manifest's
    ``rewritten_from`` names the digests it replaced."""
    import fsspec

    notes = rewrites(uri)
    if notes:
        uri = _sibling(uri, notes[-1]["rewritten_into"])
    fs, root = fsspec.core.url_to_fs(uri)
    with fs.open(f"{root}/{MANIFEST}", "r") as f:
        manifest = json.load(f)
    rows = {name: _read_rows(fs, f"{root}/{manifest['files'][name]}") if name in splits else []
            for name in ("train", "holdout")}
    return Snapshot(manifest, rows["train"], rows["holdout"], uri)


def _sibling(uri: str, digest: str) -> str:
    """The folder of ``digest`` in the same store as the snapshot folder ``uri`` (the store may have moved)."""
    return f"{uri.rstrip('/').rsplit('/', 1)[0]}/{digest.removeprefix('sha256:')}"


def rewritten_note(uri: str) -> dict | None:
    """The note an erasure left at the snapshot folder ``uri`` (``adaptloop.ops.erasure_sweep``), or None."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.exists(f"{root}/{REWRITTEN}"):
        return None
    with fs.open(f"{root}/{REWRITTEN}", "r") as f:
        return json.load(f)


def rewrites(uri: str) -> list[dict]:
    """The notes erasures left from the snapshot folder ``uri`` to the one that holds its content now, oldest
    first (``[]``: never rewritten). Each names the digest it replaced, the new one and the erasure ids."""
    notes: list[dict] = []
    while (note := rewritten_note(uri)) is not None:
        if len(notes) >= MAX_REWRITES:
            raise ValueError(f"{uri}: more than {MAX_REWRITES} rewrites to follow")
        notes.append(note)
        uri = _sibling(uri, note["rewritten_into"])
    return notes


# -- the method follows the signal ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which recipe a snapshot's train split calls for, with the examples in that recipe's shape."""

    method: str
    examples: list[dict]
    reason: str
    counts: dict[str, int] = field(default_factory=dict)


def _prompt(row: Mapping[str, Any]) -> list[dict]:
    return row["prompt_messages"]


def _turn(row: Mapping[str, Any]) -> dict[str, Any]:
    """Where a preference example's turn happens: the trajectory before it and the tools it had."""
    return {"prompt_messages": _prompt(row), "tools_json": row.get("tools_json")}


def _sft(row: Mapping[str, Any]) -> dict[str, Any]:
    """An SFT example: the trajectory up to the target turn (its tools, its earlier turns) and the target turn."""
    return {"prompt_messages": _prompt(row), "completion": row["completion"],
            "completion_tool_calls": list(row.get("completion_tool_calls") or []), "tools_json": row.get("tools_json")}


def choose_method(train: Sequence[Mapping[str, Any]], method: str = "auto") -> Plan:
    """The method follows the signal:

    * only desirable answers, none a pair -> ``sft`` (successes and corrections);
    * only correction pairs                -> ``dpo`` (chosen = correction, rejected = the original);
    * desirable and undesirable verdicts, no pairs -> ``kto`` (class weights from the ratio);
    * several kinds (pairs beside successes or failures) -> ``kto`` on the mixture: every right answer
      desirable, every failed answer and every corrected original undesirable (KTO takes unpaired
      evidence, so no example is thrown away);
    * only undesirable -> ``kto`` with one class, which the recipe refuses (single-class KTO data).

    ``method`` other than ``auto`` (TrainerSettings.method) forces one recipe on whatever fits it.
    """
    desirable = [r for r in train if r["signal"] == DESIRABLE]
    undesirable = [r for r in train if r["signal"] == UNDESIRABLE]
    pairs = [r for r in desirable if is_pair(r)]
    counts = {"desirable": len(desirable), "undesirable": len(undesirable), "pairs": len(pairs)}
    if method == "sft" or (method == "auto" and desirable and not undesirable and not pairs):
        return Plan("sft", [_sft(r) for r in desirable],
                    f"{len(desirable)} right answers (successes and corrections)"
                    + (" (method forced)" if method == "sft" else ", no pairs, no failures"), counts)
    if method == "dpo" or (method == "auto" and pairs and len(pairs) == len(desirable) and not undesirable):
        return Plan("dpo", [_turn(r) | {"chosen": turn_text(r), "rejected": turn_text(r, "rejected")} for r in pairs],
                    f"{len(pairs)} corrections paired with the rejected original", counts)
    kto = [_turn(r) | {"completion": turn_text(r), "label": True} for r in desirable]
    kto += [_turn(r) | {"completion": turn_text(r), "label": False} for r in undesirable]
    if pairs:
        kto += [_turn(r) | {"completion": turn_text(r, "rejected"), "label": False} for r in pairs]
        return Plan("kto", kto, f"mixture: {len(desirable)} right answers ({len(pairs)} with their rejected "
                                f"original) and {len(undesirable)} failed answers", counts | {"mixture": 1})
    return Plan("kto", kto, f"verdicts: {len(desirable)} desirable, {len(undesirable)} undesirable", counts)
