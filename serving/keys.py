"""Gateway API keys: each key belongs to one tenant; only its sha256 is stored.

    adaptloop keys add acme --file ~/.cache/adaptloop/keys.json   # prints the key once
    adaptloop keys revoke 1a2b3c4d --file ~/.cache/adaptloop/keys.json   # by the id in alk_<id>_...
    ADAPTLOOP_GATEWAY_API_KEYS_FILE=~/.cache/adaptloop/keys.json adaptloop gateway

A key looks like ``alk_<id>_<secret>``: ``id`` (8 hex) finds the entry in O(1), the secret is 32
random bytes. Why sha256 and not a slow KDF (scrypt, argon2): a slow hash protects guessable
passwords; these keys carry 256 random bits, so a leaked hash cannot be brute-forced either way,
and a slow KDF on every request would cost far more than the gateway's whole latency budget
(p99 overhead < 2 ms). GitHub and Stripe store their tokens the same way. Comparison is
constant-time (``hmac.compare_digest``).

The key file is JSON ``{"keys": [{"id", "tenant", "sha256", "created_at"}]}``; development stacks
may instead pass plain keys as ``ADAPTLOOP_GATEWAY_API_KEYS="tenant=key,..."`` (hashed at start).
A gateway notices a change of its key file within ``RELOAD_CHECK_S`` (a revoked key stops working
without a restart); a file it cannot read keeps the keys it had, with an error in its log. ``add``
and ``revoke`` hold an exclusive lock on ``<file>.lock`` while they rewrite the file, keep every
other entry as it was, and replace the file in one rename.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from adaptloop.errors import AuthError, ConfigError
from adaptloop.schemas.contract import now_ms

PREFIX = "alk_"
#: How often a gateway looks at its key file for a change (one stat call).
RELOAD_CHECK_S = 1.0

log = logging.getLogger(__name__)


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
    """key -> tenant, from hashed entries; with a key ``file``, reloaded when the file changes."""

    def __init__(self, entries: Iterable[KeyEntry] = (), *, file: Path | None = None,
                 plain: Iterable[KeyEntry] = ()) -> None:
        self._file, self._plain = file, list(plain)
        self._by_id = self._index(entries)
        self._seen = self._stamp()
        self._checked = time.monotonic()

    @staticmethod
    def _index(entries: Iterable[KeyEntry]) -> dict[str, KeyEntry]:
        by_id: dict[str, KeyEntry] = {}
        for entry in entries:
            if entry.key_id in by_id:
                raise ConfigError(f"two API keys share the id {entry.key_id}")
            by_id[entry.key_id] = entry
        return by_id

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self._file) if self._file else None
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size) if stat else None

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self._file is None or now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        stamp = self._stamp()
        if stamp == self._seen:
            return
        try:
            self._by_id = self._index([*read_key_file(self._file), *self._plain])
        except ConfigError as exc:  # a half-edited file: keep serving with the keys we had, loudly
            log.error("kept the previous API keys: %s", exc)
            return
        self._seen = stamp
        log.info("API keys reloaded from %s: %d keys", self._file, len(self._by_id))

    def __len__(self) -> int:
        return len(self._by_id)

    def tenants(self) -> set[str]:
        return {e.tenant for e in self._by_id.values()}

    def tenant_of(self, key: str | None) -> str:
        """The key's tenant; ``AuthError`` for a missing, malformed, unknown or revoked key."""
        if not key:
            raise AuthError("no API key: send 'Authorization: Bearer <key>'")
        self._reload_if_changed()
        key_id = _key_id(key)
        entry = self._by_id.get(key_id) if key_id else None
        if entry is None or not hmac.compare_digest(entry.sha256, _digest(key)):
            raise AuthError("invalid API key")
        return entry.tenant

    @classmethod
    def load(cls, file: Path | None = None, plain: str | None = None) -> "KeyStore":
        """Entries from a key file (watched) and/or ``tenant=key,...`` plain text (dev stacks)."""
        plain_entries = []
        for item in filter(None, (part.strip() for part in (plain or "").split(","))):
            tenant, sep, key = item.partition("=")
            if not sep:
                raise ConfigError("ADAPTLOOP_GATEWAY_API_KEYS entries are 'tenant=key'")
            plain_entries.append(entry_for(tenant.strip(), key.strip()))
        from_file = read_key_file(file) if file else []
        return cls([*from_file, *plain_entries], file=Path(file) if file else None, plain=plain_entries)


def _rows(file: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(file.read_text())["keys"]
        for row in rows:
            KeyEntry(row["id"], row["tenant"], row["sha256"])
        return rows
    except FileNotFoundError as exc:
        raise ConfigError(f"API key file {file} does not exist") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"API key file {file} is not a key file: {exc}") from exc


def read_key_file(file: Path) -> list[KeyEntry]:
    return [KeyEntry(row["id"], row["tenant"], row["sha256"]) for row in _rows(Path(file))]


@contextlib.contextmanager
def _locked_rows(file: Path) -> Iterator[list[dict[str, Any]]]:
    """The key file's rows, to change in place and write back (0600: it holds no secret, but names tenants),
    under an exclusive lock: two ``keys`` commands at once must not lose each other's change."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file.with_name(file.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = _rows(file) if file.exists() else []
        yield rows
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(json.dumps({"keys": rows}, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(file)


def add_to_key_file(file: Path, entry: KeyEntry) -> None:
    """Append an entry; every other entry stays as it was."""
    with _locked_rows(Path(file)) as rows:
        if any(row["id"] == entry.key_id for row in rows):
            raise ConfigError(f"the key file already has a key with id {entry.key_id}")
        rows.append({"id": entry.key_id, "tenant": entry.tenant, "sha256": entry.sha256,
                     "created_at": now_ms()})


def revoke_in_key_file(file: Path, key_id: str) -> str:
    """Remove the key ``key_id`` (the ``<id>`` of ``alk_<id>_<secret>``, or the whole key); its tenant."""
    key_id = _key_id(key_id) or key_id
    with _locked_rows(Path(file)) as rows:
        gone = [row for row in rows if row["id"] == key_id]
        if not gone:
            raise ConfigError(f"no key with id {key_id} in {file}")
        rows[:] = [row for row in rows if row["id"] != key_id]
    return gone[0]["tenant"]


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
    revoke = sub.add_parser("revoke", help="remove a key: gateways refuse it within a second, no restart")
    revoke.add_argument("key_id", help="the key's id (alk_<id>_...) or the whole key")
    revoke.add_argument("--file", type=Path, required=True, help="the key file the gateway reads")
    args = parser.parse_args(argv)
    try:
        if args.command == "revoke":
            tenant = revoke_in_key_file(args.file, args.key_id)
            print(f"revoked key {_key_id(args.key_id) or args.key_id} of tenant {tenant}")
            return 0
        key, entry = generate_key(args.tenant)
        add_to_key_file(args.file, entry)
    except ConfigError as exc:
        print(f"adaptloop keys: {exc}", file=sys.stderr)
        return 1
    print(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
