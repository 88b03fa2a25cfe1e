"""What ``adaptloop forget`` deletes and rewrites in the trainer's stores, once the broker took its records.

    store = ArtifactStore.of(TrainerSettings())        # the trainer's artifact_dir and dataset store
    sweep = sweep_store(store, plan, records)          # after the erasure, decisions and requests

Forget first publishes (the tombstone, the decisions, the retraining requests, each acknowledged), then:

* dataset snapshots: every snapshot of the erasure's tenant in the dataset store is read, and one with a
  row that any of the tenant's erasures matches (``ErasureSet.match``, as curation and the trainer match)
  is rewritten without it into a new content-addressed folder (``snapshot.erase_rows``); the old folder
  keeps only ``rewritten.json`` (which erasures, the new digest, how many rows: no content), which
  ``read_snapshot`` (the trainer's regression suite) and ``adaptloop lineage`` follow. A half-written
  folder older than ``INCOMPLETE_AFTER_S`` (a trainer killed mid-write: its replay writes it again whole)
  is deleted; a younger one is being written and is left, named as a problem: run forget again later.
* adapters: every version that trained on a matched example and is not live after this forget (retired
  by ``--retire`` now; retired, rolled back or rejected before) loses what the trainer wrote for it: its
  artifact folder, ``<artifact_dir>/<request id>`` (adapter and checkpoints) and Ray's run state
  ``<artifact_dir>/ray/<request id>``. Only paths inside ``artifact_dir`` and none that a live version
  still uses. A flagged adapter is live: it stays, and serves, until its retrained successor replaces it
  (the canary promotes the successor and retires it); then the same forget, run again, deletes it (forget
  is idempotent: no second decision, no second request). The serving sidecar deletes its own read-only
  pinned copy when it unloads a version (``serving.server``).

Everything is deleted, not overwritten: the file system may keep the freed blocks until it reuses them
(an encrypted disk or bucket is the answer to that, not this module).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

from adaptloop.artifacts import artifact_path, delete_tree
from adaptloop.erasure import ErasureSet
from adaptloop.errors import ArtifactError
from adaptloop.ops.lineage import LineageRecords, decisions_by_version
from adaptloop.schemas.contract import SERVABLE, now_ms
from adaptloop.settings import TrainerSettings


class PublishedErasure(Protocol):
    """What the sweep reads of forget's plan (``adaptloop.ops.forget.ForgetPlan``; named by shape, so that forget
    imports the sweep and not both ways): the erasure it published and its adapter actions, each with
    ``version`` and ``decision`` (the release record it published, or None)."""

    erasure: dict
    adapters: list

#: A snapshot folder without a manifest this old was left by a killed trainer, not one writing it now.
INCOMPLETE_AFTER_S = 600.0
#: Folders of ``artifact_dir`` that are not one request's: never deleted whole.
RESERVED = frozenset({"", ".", "..", "datasets", "ray"})


@dataclass(frozen=True)
class ArtifactStore:
    """Where the trainer writes: adapters, checkpoints and Ray's run state (``artifact_dir``, a local or shared
    folder) and dataset snapshots (``dataset_store``, an fsspec URL; by default ``artifact_dir`` itself)."""

    artifact_dir: Path
    dataset_store: str

    @classmethod
    def of(cls, settings: TrainerSettings) -> "ArtifactStore":
        return cls(Path(settings.artifact_dir).resolve(), settings.store_url())


@dataclass
class Sweep:
    """What one forget did to the stores."""

    snapshots: list[dict] = field(default_factory=list)  # rewrite notes; finished or incomplete folders deleted
    adapters: list[dict] = field(default_factory=list)  # {"version", "deleted": [{path, files}], "kept": [{path, why}]}
    problems: list[str] = field(default_factory=list)  # what may still hold erased content, and why

    def summary(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        lines = []
        for s in self.snapshots:
            if "rewritten_into" in s:
                lines.append(f"  snapshot {s['digest'][:19]} rewritten without {s['rows_removed']} example(s) into "
                             f"{s['rewritten_into'][:19]}; the old files are deleted")
            else:
                lines.append(f"  snapshot folder {s.get('finished') or s.get('incomplete')}: "
                             f"{len(s['files_deleted'])} leftover file(s) deleted")
        for a in self.adapters:
            for d in a["deleted"]:
                lines.append(f"  adapter {a['version']}: deleted {d['path']} ({d['files']} files)")
            for k in a["kept"]:
                lines.append(f"  adapter {a['version']}: kept {k['path']}: {k['why']}")
        lines += [f"  NOT ERASED: {problem}" for problem in self.problems]
        return lines


# -- snapshots ---------------------------------------------------------------------------------------


def snapshot_folders(store: str) -> list[str]:
    """The URI of every folder under ``<store>/datasets`` (complete, half-written or rewritten), by name."""
    import fsspec

    from adaptloop.trainers.snapshot import snapshot_uri

    fs, root = fsspec.core.url_to_fs(snapshot_uri(store, ""))
    if not fs.isdir(root):
        return []
    return [snapshot_uri(store, path.rstrip("/").rsplit("/", 1)[-1])
            for path in sorted(fs.ls(root, detail=False)) if fs.isdir(path)]


def _files(fs, root: str) -> list[str]:
    """A snapshot folder's files (relative) but its note: data files first, the manifest last."""
    from adaptloop.trainers.snapshot import MANIFEST, REWRITTEN

    if not fs.isdir(root):
        return []
    prefix = root.rstrip("/") + "/"
    names = [path.removeprefix(prefix) for path in fs.find(root)]
    return sorted((n for n in names if n != REWRITTEN), key=lambda n: (n == MANIFEST, n))


def _age_s(fs, root: str) -> float | None:
    """Seconds since the newest file of ``root`` changed; None if the store cannot say."""
    try:
        newest = max(fs.modified(path).timestamp() for path in fs.find(root))
    except (NotImplementedError, ValueError, OSError):
        return None
    return time.time() - newest


def rewrite_snapshot(uri: str, erasures: ErasureSet, *, at_ms: int) -> dict | None:
    """Rewrite the snapshot folder ``uri`` without the rows ``erasures`` matches; what was done, or None.

    In this order, so that a crash at any point leaves content only where running it again finds it: the
    new snapshot (``write_snapshot``, its manifest last), then ``rewritten.json`` at the old folder, then
    the old folder's data files, its manifest last. A folder that already has its note is only finished
    off (leftover files deleted).
    """
    import fsspec

    from adaptloop.trainers.snapshot import REWRITTEN, REWRITTEN_FORMAT, erase_rows, read_snapshot, write_snapshot

    fs, root = fsspec.core.url_to_fs(uri)
    if fs.exists(f"{root}/{REWRITTEN}"):
        leftovers = _files(fs, root)
    else:
        old = read_snapshot(uri)
        erased = erase_rows(old, erasures)
        if erased is None:
            return None
        rewritten, removed = erased
        written = write_snapshot(rewritten, uri.rstrip("/").rsplit("/", 2)[0])
        note = {"format": REWRITTEN_FORMAT, "digest": old.digest, "rewritten_into": rewritten.digest,
                "uri": written.uri, "erasure_ids": sorted(set(removed.values())), "rows_removed": len(removed),
                "rewritten_at": at_ms}
        with fs.open(f"{root}/{REWRITTEN}", "w") as f:
            f.write(json.dumps(note, indent=1, sort_keys=True))
        for name in _files(fs, root):
            fs.rm(f"{root}/{name}")
        return note
    for name in leftovers:
        fs.rm(f"{root}/{name}")
    return {"finished": uri, "files_deleted": leftovers} if leftovers else None


def sweep_snapshots(dataset_store: str, erasures: ErasureSet, tenant: str, sweep: Sweep, *, at_ms: int) -> None:
    """Rewrite every snapshot of ``tenant`` that ``erasures`` matches; finish or clear what a crash left."""
    import fsspec

    from adaptloop.trainers.snapshot import MANIFEST, REWRITTEN

    for uri in snapshot_folders(dataset_store):
        fs, root = fsspec.core.url_to_fs(uri)
        try:
            if fs.exists(f"{root}/{MANIFEST}") and not fs.exists(f"{root}/{REWRITTEN}"):
                with fs.open(f"{root}/{MANIFEST}", "r") as f:
                    if json.load(f).get("tenant") != tenant:
                        continue
            elif not fs.exists(f"{root}/{REWRITTEN}"):  # half-written: being written now, or left by a crash
                age = _age_s(fs, root)
                if age is None or age < INCOMPLETE_AFTER_S:
                    sweep.problems.append(f"snapshot folder {uri} is being written (no manifest yet): run forget "
                                          "again once the trainer is done with it")
                    continue
                files = _files(fs, root)
                fs.rm(root, recursive=True)
                sweep.snapshots.append({"incomplete": uri, "files_deleted": files})
                continue
            done = rewrite_snapshot(uri, erasures, at_ms=at_ms)
        except (OSError, ValueError, KeyError) as exc:  # pyarrow's errors are ValueErrors and OSErrors
            sweep.problems.append(f"snapshot {uri}: {type(exc).__name__}: {exc}")
            continue
        if done is not None:
            sweep.snapshots.append(done)


# -- adapters ----------------------------------------------------------------------------------------


def _local(uri: str) -> Path | None:
    try:
        return artifact_path(uri).resolve()
    except ArtifactError:  # another scheme: not on this disk
        return None


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def adapter_paths(release: Mapping[str, Any], artifact_dir: Path) -> list[Path]:
    """What the trainer wrote for ``release`` (see ``trainers.ray_job``): the artifact folder, the request's
    folder (adapter and checkpoints) and Ray's run state of the request; a path held by another left out."""
    paths = [p for p in [_local(release["artifact_uri"]) if release.get("artifact_uri") else None] if p]
    request_id = release["lineage"]["request_id"]
    if Path(request_id).name == request_id and request_id not in RESERVED:
        paths += [artifact_dir / request_id, artifact_dir / "ray" / request_id]
    return [p for p in paths if not any(_inside(p, other) for other in paths)]


def sweep_adapters(artifact_dir: Path, after: Mapping[str, Mapping[str, Any]], learned: list[str],
                   sweep: Sweep) -> None:
    """Delete what the trainer wrote for each ``learned`` version that ``after`` (version -> its newest record,
    this forget's decisions included) says is not live; a live (flagged) one is kept and said so."""
    artifact_dir = Path(artifact_dir).resolve()
    live = [p for r in after.values() if r["state"] in SERVABLE and r.get("artifact_uri")
            for p in [_local(r["artifact_uri"])] if p]
    for version in learned:
        release = after[version]
        entry: dict[str, Any] = {"version": version, "deleted": [], "kept": []}
        sweep.adapters.append(entry)
        if release["state"] in SERVABLE:
            entry["kept"].append({"path": release.get("artifact_uri"), "why": (
                f"{release['state']} and flagged: it serves until its retrained successor replaces it; "
                "run this forget again then to delete it")})
            continue
        if release.get("artifact_uri") and _local(release["artifact_uri"]) is None:
            entry["kept"].append({"path": release["artifact_uri"], "why": "not a local path: delete it where it is"})
            sweep.problems.append(f"adapter {version}: artifact {release['artifact_uri']} not deleted (not local)")
        for path in adapter_paths(release, artifact_dir):
            if not path.exists():
                continue  # nothing there (deleted before, or never written): nothing to erase
            if not _inside(path, artifact_dir) or (path.parent == artifact_dir and path.name in RESERVED):
                entry["kept"].append({"path": str(path), "why": f"outside the artifact store {artifact_dir}"})
                sweep.problems.append(f"adapter {version}: {path} is outside {artifact_dir}: not deleted")
                continue
            if any(path == p or _inside(p, path) or _inside(path, p) for p in live):
                entry["kept"].append({"path": str(path), "why": "a live version's artifact is there"})
                continue
            try:
                files = delete_tree(path)
            except ArtifactError as exc:
                sweep.problems.append(f"adapter {version}: {exc}")
                continue
            entry["deleted"].append({"path": str(path), "files": files})


def sweep_store(store: ArtifactStore, plan: PublishedErasure, records: LineageRecords, *,
                at_ms: int | None = None) -> Sweep:
    """After forget published ``plan``: rewrite the tenant's snapshots that any of its erasures matches, and
    delete the artifacts of every version that learned from the erased examples and is not live now."""
    at_ms = now_ms() if at_ms is None else at_ms
    tenant = plan.erasure["tenant"]
    erasures = ErasureSet.of([p.record for p in records.erasures if p.record["tenant"] == tenant] + [plan.erasure])
    sweep = Sweep()
    sweep_snapshots(store.dataset_store, erasures, tenant, sweep, at_ms=at_ms)
    after = {version: decisions[-1].record for version, decisions in decisions_by_version(records.releases).items()}
    after |= {a.version: a.decision for a in plan.adapters if a.decision}
    sweep_adapters(store.artifact_dir, after, [a.version for a in plan.adapters], sweep)
    return sweep
