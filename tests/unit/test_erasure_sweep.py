"""What forget deletes and rewrites, on real folders: snapshots rewritten without erased rows (the old folder
keeps a note, no content), a retired adapter's files deleted, a sidecar's pinned copy dropped, the outbox
emptied of what the broker took. No broker: the forget plan is built from records, as forget builds it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from adaptloop.artifacts import artifact_digest, pinned_copy
from adaptloop.erasure import ErasureSet, build_erasure
from adaptloop.ops.erasure_sweep import (INCOMPLETE_AFTER_S, ArtifactStore, Sweep, rewrite_snapshot, sweep_snapshots,
                                         sweep_store)
from adaptloop.ops.forget import plan_forget, render
from adaptloop.ops.lineage import LineageRecords, adapter_lineage, dataset_rewrites, render_adapter
from adaptloop.records import Positioned
from adaptloop.serving.outbox import Outbox
from adaptloop.serving.registry import Release
from adaptloop.serving.server import Sidecar
from adaptloop.settings import Topics
from adaptloop.trainers.snapshot import REWRITTEN, build_snapshot, read_snapshot, rewrites, write_snapshot

TENANT, TASK = "acme", "order-extract"
SECRET = "zebra-quartz-4471"  # what the erased examples said, and nothing else does


def curated(i: int, *, session: str, text: str = "", tenant: str = TENANT, split: str = "TRAIN",
            subjects: tuple[str, ...] = ()) -> dict:
    return {"example_id": f"i-{i}", "tenant": tenant, "task": TASK, "session_id": session, "split": split,
            "kind": "SUCCESS", "admitted": True, "reject_reason": None,
            "prompt_messages": [{"role": "user", "content": f"order {i} {text}"}], "completion": f'{{"n": {i}}}',
            "rejected": None, "score": 1.0, "scorer": "order_json@1", "subjects": list(subjects),
            "redactions": [], "curated_at": 1_700_000_000_000 + i,
            "lineage": {"interaction": {"topic": "agent.interactions", "partition": 0, "offset": i},
                        "outcomes": [], "outcome_ids": [], "code_version": "test", "winning_outcome_id": None},
            "served_by": None, "event_time": 0, "outcome_source": "VALIDATOR", "content_hash": "",
            "near_duplicate_of": None}


def examples(tenant: str = TENANT) -> list[dict]:
    """i-0, i-1 (session s-gone) hold the secret; i-2 has subject key subj:x; i-3, i-4 (holdout) are plain."""
    return [curated(0, session="s-gone", text=SECRET, tenant=tenant), curated(1, session="s-gone", text=SECRET,
                                                                               tenant=tenant),
            curated(2, session="s-2", subjects=("subj:x",), tenant=tenant), curated(3, session="s-3", tenant=tenant),
            curated(4, session="s-4", split="HOLDOUT", tenant=tenant)]


def write(store: str, records: list[dict], tenant: str = TENANT):
    ranges = [{"topic": "examples.curated", "partition": 0, "start_offset": 0, "end_offset": len(records)}]
    built = build_snapshot([(0, i, r) for i, r in enumerate(records)], tenant=tenant, task=TASK, ranges=ranges)
    return write_snapshot(built, store)


def readable(path: Path) -> bytes:
    """A file's bytes, and a Parquet file's decoded rows too (compressed pages can hide a text's bytes)."""
    data = path.read_bytes()
    if data.startswith(b"PAR1") and data.endswith(b"PAR1"):
        import pyarrow.parquet as pq

        data += json.dumps(pq.read_table(path).to_pylist()).encode()
    return data


def holding(root: Path, *needles: str) -> list[str]:
    """Every file under ``root`` that contains one of ``needles``."""
    return [str(p) for p in root.rglob("*") if p.is_file() and any(n.encode() in readable(p) for n in needles)]


def session_erasure(erasure_id: str = "era-s") -> dict:
    return build_erasure(tenant=TENANT, scope="SESSION", key="s-gone", erasure_id=erasure_id)


def test_a_snapshot_holding_erased_examples_is_rewritten_and_the_old_one_keeps_only_a_note(tmp_path):
    store = str(tmp_path)
    old = write(store, examples())
    other_tenant = write(store, examples("globex"), "globex")  # same texts, another tenant: not this erasure's
    assert holding(tmp_path, SECRET)

    sweep = Sweep()
    sweep_snapshots(store, ErasureSet.of([session_erasure()]), TENANT, sweep, at_ms=7)
    assert sweep.problems == []
    (note,) = sweep.snapshots
    assert note["digest"] == old.digest and note["rows_removed"] == 2 and note["erasure_ids"] == ["era-s"]
    old_folder = Path(old.uri)
    assert [p.name for p in old_folder.iterdir()] == [REWRITTEN]  # no data file, no manifest: only the note
    assert SECRET not in (old_folder / REWRITTEN).read_text() and "i-0" not in (old_folder / REWRITTEN).read_text()
    assert holding(tmp_path, SECRET) == holding(Path(other_tenant.uri), SECRET) != []  # only globex's copy

    # Readers follow the note: the release's dataset_uri still resolves, to the content without the rows.
    back = read_snapshot(old.uri)
    assert back.digest == note["rewritten_into"] != old.digest and back.uri == note["uri"]
    assert back.train_ids == ["i-2", "i-3"] and [r["example_id"] for r in back.holdout] == ["i-4"]
    manifest = back.manifest
    assert manifest["rewritten_from"] == [{"digest": old.digest, "erasure_ids": ["era-s"], "rows_removed": 2}]
    assert manifest["erasures"] == {"excluded": 2, "erasure_ids": ["era-s"]} and manifest["dropped"]["erased"] == 2
    assert manifest["counts"]["train"] == {"SUCCESS": 2} and manifest["source"] == old.manifest["source"]

    # Again: nothing to do. A second erasure (a subject key a row kept) rewrites the new one; both notes chain.
    again = Sweep()
    sweep_snapshots(store, ErasureSet.of([session_erasure()]), TENANT, again, at_ms=8)
    assert again.snapshots == [] and again.problems == []
    subject = build_erasure(tenant=TENANT, scope="SUBJECT", key="subj:x", erasure_id="era-x")
    sweep_snapshots(store, ErasureSet.of([session_erasure(), subject]), TENANT, again, at_ms=9)
    assert [n["erasure_ids"] for n in rewrites(old.uri)] == [["era-s"], ["era-x"]]
    assert read_snapshot(old.uri).train_ids == ["i-3"]
    assert dataset_rewrites(old.uri) == rewrites(old.uri) and dataset_rewrites("") == []


def test_a_crash_mid_rewrite_is_finished_and_a_stale_half_written_folder_deleted(tmp_path):
    store = str(tmp_path)
    old = write(store, examples())
    root = Path(old.uri)
    kept = {p.name: p.read_bytes() for p in root.iterdir()}
    note = rewrite_snapshot(old.uri, ErasureSet.of([session_erasure()]), at_ms=1)
    for name, data in kept.items():  # as if forget died after writing the note, before deleting
        (root / name).write_bytes(data)
    assert read_snapshot(old.uri).digest == note["rewritten_into"]  # readers already follow the note
    done = rewrite_snapshot(old.uri, ErasureSet.of([session_erasure()]), at_ms=2)
    assert done == {"finished": old.uri, "files_deleted": ["holdout.parquet", "train.parquet", "manifest.json"]}

    # A trainer killed mid-write left data files without a manifest: deleted once stale, named while fresh.
    half = tmp_path / "datasets" / ("f" * 64)
    half.mkdir()
    (half / "train.parquet").write_bytes(b"PAR1 " + SECRET.encode())
    fresh = Sweep()
    sweep_snapshots(store, ErasureSet.of([session_erasure()]), TENANT, fresh, at_ms=3)
    assert len(fresh.problems) == 1 and "being written" in fresh.problems[0] and half.exists()
    stale = time.time() - INCOMPLETE_AFTER_S - 60
    os.utime(half / "train.parquet", (stale, stale))
    swept = Sweep()
    sweep_snapshots(store, ErasureSet.of([session_erasure()]), TENANT, swept, at_ms=4)
    assert swept.snapshots == [{"incomplete": f"{store}/datasets/{'f' * 64}", "files_deleted": ["train.parquet"]}]
    assert not half.exists() and holding(tmp_path, SECRET) == []


def adapter_release(version: str, request_id: str, artifact: Path | str, train_ids: list[str], *,
                    state: str = "RELEASED") -> dict:
    examples_range = [{"topic": "examples.curated", "partition": 0, "start_offset": 0, "end_offset": 5}]
    return {"version": version, "tenant": TENANT, "task": TASK, "state": state, "reason": "gate passed",
            "base_model": "smollm2", "artifact_uri": str(artifact), "digest": "sha256:" + "0" * 64, "lora_rank": 8,
            "method": "sft",
            "evaluation": {"metric": "success_rate:order_json@1", "holdout_count": 1, "candidate_score": 0.9,
                           "incumbent": "base", "incumbent_score": 0.1, "margin": 0.05},
            "lineage": {"request_id": request_id, "dataset_digest": "sha256:" + "d" * 64, "examples": examples_range,
                        "train_example_ids": train_ids, "code_version": "test", "config_json": "{}",
                        "dataset_uri": "", "parent_version": None},
            "created_at": 1_700_000_200_000, "regression": [], "decided_by": "gate", "evidence_json": "{}",
            "training_json": "{}", "base_model_digest": None}


def trained(artifacts: Path, request_id: str) -> Path:
    """What the trainer writes for a request: the adapter, checkpoints, Ray's run state (all holding the secret,
    as weights that memorised it would)."""
    adapter = artifacts / request_id / "adapter"
    for folder in (adapter, artifacts / request_id / "checkpoints" / "checkpoint-4",
                   artifacts / "ray" / request_id / "checkpoint_000000"):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"\x00weights " + SECRET.encode())
        (folder / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").chmod(0o444)  # read-only files are deleted too
    return adapter


def lineage_records(releases: list[dict]) -> LineageRecords:
    return LineageRecords(curated=[Positioned("examples.curated", 0, i, r) for i, r in enumerate(examples())],
                          releases=[Positioned("adapters.releases", 0, i, r) for i, r in enumerate(releases)])


def test_retire_deletes_what_the_trainer_wrote_for_the_adapter_and_keeps_what_serves(tmp_path):
    artifacts = tmp_path / "artifacts"
    gone = adapter_release("acme--order-extract--v1", "r1", trained(artifacts, "r1"), ["i-0", "i-2", "i-3"])
    clean = adapter_release("acme--order-extract--v2", "r2", trained(artifacts, "r2"), ["i-3"])  # no erased example
    outside = tmp_path / "elsewhere" / "adapter"
    outside.mkdir(parents=True)
    stray = adapter_release("acme--order-extract--v0", "r0", outside, ["i-1"], state="ROLLED_BACK")
    records = lineage_records([stray, gone, clean])
    erasure = session_erasure()
    plan = plan_forget(erasure, records, retire=True)
    assert {a.version: a.action for a in plan.adapters} == {"acme--order-extract--v0": "none (not live)",
                                                            "acme--order-extract--v1": "retire"}

    store = ArtifactStore(artifacts, str(artifacts))
    sweep = plan.sweep = sweep_store(store, plan, records, at_ms=1)
    by_version = {a["version"]: a for a in sweep.adapters}
    assert sorted(d["path"] for d in by_version["acme--order-extract--v1"]["deleted"]) == [
        str(artifacts / "r1"), str(artifacts / "ray" / "r1")]
    assert not (artifacts / "r1").exists() and not (artifacts / "ray" / "r1").exists()
    assert (artifacts / "r2" / "adapter").is_dir() and (artifacts / "ray" / "r2").is_dir()  # v2 learned nothing erased
    # A folder outside the artifact store is not forget's to delete: it says so, and exits 1.
    assert outside.is_dir() and by_version["acme--order-extract--v0"]["kept"][0]["why"].startswith("outside")
    assert sweep.problems and "outside" in sweep.problems[0]
    text = render(plan)
    assert f"deleted {artifacts / 'r1'}" in text and "NOT ERASED" in text
    assert plan.summary()["store"]["adapters"] == sweep.summary()["adapters"]
    assert sorted(holding(artifacts, SECRET)) == sorted(holding(artifacts / "r2", SECRET)
                                                        + holding(artifacts / "ray" / "r2", SECRET))


def test_a_flagged_adapter_keeps_its_files_until_it_is_no_longer_live(tmp_path):
    artifacts = tmp_path / "artifacts"
    snapshot = write(str(artifacts), examples())
    flagged = adapter_release("acme--order-extract--v1", "r1", trained(artifacts, "r1"), ["i-0", "i-3"])
    flagged["lineage"]["dataset_uri"] = snapshot.uri
    records = lineage_records([flagged])
    plan = plan_forget(session_erasure(), records, retire=False)
    sweep = sweep_store(ArtifactStore(artifacts, str(artifacts)), plan, records, at_ms=1)
    (entry,) = sweep.adapters
    assert entry["deleted"] == [] and "run this forget again" in entry["kept"][0]["why"]
    assert (artifacts / "r1" / "adapter").is_dir() and sweep.problems == []
    # Its snapshot was rewritten all the same; lineage says by which erasure, and where its content is now.
    view = adapter_lineage("acme--order-extract--v1", records)
    view["dataset"]["rewritten"] = dataset_rewrites(view["dataset"]["uri"])
    assert f"rewritten by erasure era-s: 2 example(s) out, now {sweep.snapshots[0]['rewritten_into']}" in \
        render_adapter(view)

    # Its successor was promoted and the canary retired it: the same forget, again, deletes it.
    records.releases.append(Positioned("adapters.releases", 0, 1, plan.adapters[0].decision))
    records.releases.append(Positioned("adapters.releases", 0, 2, flagged | {"state": "RETIRED"}))
    again = plan_forget(session_erasure(), records, retire=False)
    assert again.adapters[0].action == "none (already decided)"
    sweep = sweep_store(ArtifactStore(artifacts, str(artifacts)), again, records, at_ms=2)
    assert not (artifacts / "r1").exists() and holding(artifacts, SECRET) == []


def test_a_sidecar_drops_the_pinned_copy_of_a_withdrawn_version_it_does_not_hold(tmp_path):
    """A sidecar that was down while a version was retired (or that refused it) still deletes its pinned copy
    when it reads the RETIRED record; one still served by another loaded version stays."""
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "adapter_model.safetensors").write_bytes(SECRET.encode())
    digest = artifact_digest(artifact)
    pinned = pinned_copy(artifact, digest, tmp_path / "adapters")
    record = adapter_release("acme--order-extract--v1", "r1", artifact, []) | {"digest": digest}
    with httpx.Client() as http:
        sidecar = Sidecar("http://127.0.0.1:9", http, max_lora_rank=8, pinned_dir=tmp_path / "adapters")
        sidecar.loaded["acme--other--v9"] = {"digest": digest}
        sidecar.apply({"acme--order-extract--v1": Release.from_record(record | {"state": "RETIRED"}, 1)})
        assert pinned.is_dir()  # another loaded version serves the same content
        sidecar.loaded.clear()
        sidecar.apply({"acme--order-extract--v1": Release.from_record(record | {"state": "RETIRED"}, 2)})
    assert not pinned.exists() and holding(tmp_path / "adapters", SECRET) == []


@pytest.mark.parametrize("segment_bytes", [256, 1 << 20])
def test_what_the_broker_acknowledged_leaves_no_byte_in_the_outbox(tmp_path, segment_bytes):
    outbox = Outbox(tmp_path, max_bytes=1 << 20, segment_bytes=segment_bytes)
    segments = [outbox.append("agent.interactions", f"k{n}".encode(), f"{SECRET} {n}".encode() * 4)
                for n in range(12)]
    assert holding(tmp_path, SECRET)
    for segment in segments[:-1]:
        outbox.acknowledged(segment)
    # One still waits: its segment (here, the current one) keeps it, and what shares that segment.
    assert holding(tmp_path, f"{SECRET} 11")
    assert bool(holding(tmp_path, f"{SECRET} 0")) == (segment_bytes > 256)  # a sealed, all-acknowledged one is gone
    outbox.acknowledged(segments[-1])
    assert holding(tmp_path, SECRET) == []  # sealed segments deleted, the current one truncated
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) == 0
    outbox.close()
    assert [p.name for p in tmp_path.iterdir()] == ["outbox.lock"]


def test_dead_letters_expire_with_the_raw_topics():
    layout = Topics(raw_retention_ms=86_400_000).layout()
    for which in ("interactions", "outcomes", "dead_letters"):
        assert layout[Topics().name(which)][1]["retention.ms"] == "86400000"
