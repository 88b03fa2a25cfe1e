"""Adapter artifacts are named by their content: a sha256 over every file's path and bytes.

The trainer computes the digest before publishing; the serving sidecar copies the artifact to a
read-only folder named by its digest (``pinned_copy``), recomputes the digest there, refuses a mismatch,
and loads from that copy. Versioned adapter names and vLLM's integer ids derive from it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from adaptloop.errors import ArtifactError

CHUNK = 1 << 20


def artifact_path(uri: str | Path) -> Path:
    """The local folder of an artifact URI: ``file:///...`` or a plain path; ``ArtifactError`` for another scheme
    (nothing here fetches from object stores)."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    raise ArtifactError(f"unsupported artifact URI scheme {parsed.scheme!r} in {uri}")


def artifact_digest(folder: Path) -> str:
    """``sha256:<hex>`` over the sorted relative paths and contents of every file under ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def verify_digest(folder: Path, expected: str) -> None:
    actual = artifact_digest(folder)
    if actual != expected:
        raise ArtifactError(f"digest mismatch for {folder}: expected {expected}, found {actual}")


def pinned_copy(folder: Path, digest: str, store: Path) -> Path:
    """A read-only copy of ``folder`` at ``store/<digest hex>``, whose content is checked against ``digest``
    after it is copied: what a server then loads from there is what was verified, even if the shared
    artifact changes between the check and the load. An existing copy is checked again and reused."""
    pinned = Path(store) / digest.removeprefix("sha256:")
    if pinned.is_dir():
        verify_digest(pinned, digest)
        return pinned
    pinned.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{pinned.name[:16]}-", dir=pinned.parent))
    try:
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        verify_digest(staging, digest)
        for path in sorted(staging.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            path.chmod(0o555 if path.is_dir() else 0o444)
        staging.chmod(0o555)
        try:
            staging.rename(pinned)
        except OSError:  # another loader pinned the same content first: theirs is as good
            if not pinned.is_dir():
                raise
            verify_digest(pinned, digest)
    except (OSError, shutil.Error) as exc:
        raise ArtifactError(f"cannot copy {folder} to {pinned}: {exc}") from exc
    finally:
        _remove(staging)
    return pinned


def unpin(digest: str, store: Path) -> None:
    """Delete the pinned copy of ``digest`` (nothing serves it any more)."""
    _remove(Path(store) / digest.removeprefix("sha256:"))


def _remove(folder: Path) -> None:
    if folder.exists():
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(folder, ignore_errors=True)


def delete_tree(folder: Path) -> int:
    """Delete ``folder`` and everything under it, read-only copies included; the number of files it held
    (0: it was not there). Unlike ``unpin`` a failure is raised (``ArtifactError``): erasure must know."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return 0
    if folder.is_symlink() or not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder: not deleted")
    try:
        files = sum(1 for p in folder.rglob("*") if not p.is_dir())
        for path in [folder, *(p for p in folder.rglob("*") if not p.is_symlink())]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(folder)
    except OSError as exc:
        raise ArtifactError(f"cannot delete {folder}: {exc}") from exc
    return files


def adapter_version(tenant: str, task: str, digest: str) -> str:
    """The versioned adapter name served by vLLM: never reused, because the digest names the content."""
    return f"{tenant}--{task}--{digest.removeprefix('sha256:')[:16]}"


def lora_int_id(version: str) -> int:
    """A stable positive 31-bit id for vLLM, from the name (never Python's salted ``hash()``)."""
    return int.from_bytes(hashlib.sha256(version.encode()).digest()[:4], "big") & 0x7FFFFFFF or 1


def alias(tenant: str, task: str) -> str:
    """What clients ask the gateway for: ``tenant/task``."""
    return f"{tenant}/{task}"


#: Files whose names and sizes identify a base model's weights (reading 0.5-100 GB of weights would be slow).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def base_model_digest(folder: Path | str) -> str:
    """``sha256:<hex>`` fingerprint of a base model folder: ``config.json``'s bytes plus the name and
    size of every weight file (not their bytes: cheap on a multi-GB model, and a different checkpoint
    of the same architecture changes the sizes or the names only rarely, the config almost always).

    The trainer records it in each release (``base_model_digest``); the serving sidecar computes the
    same over the folder it serves and refuses an adapter whose base differs.
    """
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise ArtifactError(f"base model folder {folder} has no config.json")
    digest = hashlib.sha256(b"config.json\0" + config.read_bytes() + b"\0")
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
    return "sha256:" + digest.hexdigest()
