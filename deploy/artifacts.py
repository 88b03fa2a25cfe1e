"""Adapter artifacts are named by their content: a sha256 over every file's path and bytes.

The trainer computes the digest before publishing; the serving sidecar recomputes it before
loading and refuses a mismatch. Versioned adapter names and vLLM's integer ids derive from it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from adaptloop.errors import ArtifactError

CHUNK = 1 << 20


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


def adapter_version(tenant: str, task: str, digest: str) -> str:
    """The versioned adapter name served by vLLM: never reused, because the digest names the content."""
    return f"{tenant}--{task}--{digest.removeprefix('sha256:')[:16]}"


def lora_int_id(version: str) -> int:
    """A stable positive 31-bit id for vLLM, from the name (never Python's salted ``hash()``)."""
    return int.from_bytes(hashlib.sha256(version.encode()).digest()[:4], "big") & 0x7FFFFFFF or 1


def alias(tenant: str, task: str) -> str:
    """What clients ask the gateway for: ``tenant/task``."""
    return f"{tenant}/{task}"


def base_model_digest(folder: Path) -> str:
    """``sha256:<hex>`` of a base model folder: config.json's bytes + the sorted (name, size) of its
    ``*.safetensors`` files. Cheap (no weight reads) and enough to tell one base from another; a
    server refuses an adapter trained on a base whose fingerprint differs from the one it serves."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise ArtifactError(f"base model folder {folder} has no config.json")
    digest = hashlib.sha256(config.read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(f"\0{path.name}\0{path.stat().st_size}".encode())
    return "sha256:" + digest.hexdigest()
