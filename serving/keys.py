"""Gateway API keys: each key belongs to one tenant; only its sha256 is stored.

    adaptloop keys add acme --file ~/.cache/adaptloop/keys.json   # prints the key once
    ADAPTLOOP_GATEWAY_API_KEYS_FILE=~/.cache/adaptloop/keys.json adaptloop gateway

A key looks like ``alk_<id>_<secret>``: ``id`` (8 hex) finds the entry in O(1), the secret is 32
random bytes. Why sha256 and not a slow KDF (scrypt, argon2): a slow hash protects guessable
passwords; these keys carry 256 random bits, so a leaked hash cannot be brute-forced either way,
and a slow KDF on every request would cost far more than the gateway's whole latency budget
(p99 overhead < 2 ms). GitHub and Stripe store their tokens the same way. Comparison is
constant-time (``hmac.compare_digest``).

The key file is JSON ``{"keys": [{"id", "tenant", "sha256", "created_at"}]}``; development stacks
may instead pass plain keys as ``ADAPTLOOP_GATEWAY_API_KEYS="tenant=key,..."`` (hashed at start).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from adaptloop.errors import AuthError, ConfigError

PREFIX = "alk_"


@dataclass(frozen=True)
class KeyEntry:
    """What the gateway keeps of one key: never the key itself."""

    key_id: str
    tenant: str
    sha256: str


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key_id(key: str) -> str | None:
    if not key.startswith(PREFIX):
        return None
    key_id, sep, secret = key[len(PREFIX):].partition("_")
    return key_id if sep and key_id and secret else None


def generate_key(tenant: str) -> tuple[str, KeyEntry]:
    """A new random key for ``tenant`` and the entry to store (the key is shown once, never stored)."""
    if not tenant or "/" in tenant:
        raise ConfigError(f"a tenant name must be non-empty and without '/': {tenant!r}")
    key = f"{PREFIX}{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    return key, entry_for(tenant, key)


def entry_for(tenant: str, key: str) -> KeyEntry:
    key_id = _key_id(key)
    if key_id is None:
        raise ConfigError(f"an API key for tenant {tenant!r} is not of the form {PREFIX}<id>_<secret>")
    return KeyEntry(key_id, tenant, _digest(key))


class KeyStore:
    """key -> tenant, from hashed entries."""

    def __init__(self, entries: Iterable[KeyEntry] = ()) -> None:
        self._by_id: dict[str, KeyEntry] = {}
        for entry in entries:
            if entry.key_id in self._by_id:
                raise ConfigError(f"two API keys share the id {entry.key_id}")
            self._by_id[entry.key_id] = entry

    def __len__(self) -> int:
        return len(self._by_id)

    def tenants(self) -> set[str]:
        return {e.tenant for e in self._by_id.values()}

    def tenant_of(self, key: str | None) -> str:
        """The key's tenant; ``AuthError`` for a missing, malformed or unknown key."""
        if not key:
            raise AuthError("no API key: send 'Authorization: Bearer <key>'")
        key_id = _key_id(key)
        entry = self._by_id.get(key_id) if key_id else None
        if entry is None or not hmac.compare_digest(entry.sha256, _digest(key)):
            raise AuthError("invalid API key")
        return entry.tenant

    @classmethod
    def load(cls, file: Path | None = None, plain: str | None = None) -> "KeyStore":
        """Entries from a key file and/or ``tenant=key,...`` plain text (dev stacks)."""
        entries = list(read_key_file(file)) if file else []
        for item in filter(None, (part.strip() for part in (plain or "").split(","))):
            tenant, sep, key = item.partition("=")
            if not sep:
                raise ConfigError("ADAPTLOOP_GATEWAY_API_KEYS entries are 'tenant=key'")
            entries.append(entry_for(tenant.strip(), key.strip()))
        return cls(entries)


def read_key_file(file: Path) -> list[KeyEntry]:
    try:
        data = json.loads(Path(file).read_text())
        return [KeyEntry(e["id"], e["tenant"], e["sha256"]) for e in data["keys"]]
    except FileNotFoundError as exc:
        raise ConfigError(f"API key file {file} does not exist") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"API key file {file} is not a key file: {exc}") from exc


def add_to_key_file(file: Path, entry: KeyEntry) -> None:
    """Append an entry (created 0600: it holds no secret, but names tenants)."""
    file = Path(file)
    entries = read_key_file(file) if file.exists() else []
    rows = [{"id": e.key_id, "tenant": e.tenant, "sha256": e.sha256} for e in entries]
    rows.append({"id": entry.key_id, "tenant": entry.tenant, "sha256": entry.sha256,
                 "created_at": int(time.time() * 1000)})
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": rows}, indent=2))
    os.chmod(tmp, 0o600)
    tmp.replace(file)


def dev_keys(tenants: Iterable[str]) -> dict[str, str]:
    """One fresh key per tenant for a local stack: tenant -> key."""
    return {tenant: generate_key(tenant)[0] for tenant in tenants}


def plain_setting(keys: Mapping[str, str]) -> str:
    """``ADAPTLOOP_GATEWAY_API_KEYS`` for ``dev_keys``."""
    return ",".join(f"{tenant}={key}" for tenant, key in keys.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptloop keys", description="Manage gateway API keys (hashed).")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="create a key for a tenant; prints it once")
    add.add_argument("tenant")
    add.add_argument("--file", type=Path, required=True, help="the key file the gateway reads")
    args = parser.parse_args(argv)
    try:
        key, entry = generate_key(args.tenant)
        add_to_key_file(args.file, entry)
    except ConfigError as exc:
        print(f"adaptloop keys: {exc}", file=sys.stderr)
        return 1
    print(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
