"""The secrets a deployment's processes share: given to a process, or read from a file in the deployment's home
that the first process to need it creates.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, SecretStr

from adaptloop.errors import ConfigError
from adaptloop.shared_settings import DEFAULT_HOME


def _long_secret(value: SecretStr | None) -> SecretStr | None:
    if value is not None and len(value.get_secret_value()) < 16:
        raise ValueError("a key shorter than 16 characters is too easy to guess (empty: set one, or leave it unset)")
    return value


#: A shared secret a process is given: refused when short (an empty Secret in a manifest must not mean "no key").
Secret = Annotated[SecretStr | None, AfterValidator(_long_secret)]


#: Where a deployment's admin credential lives when no process is given one (``adaptloop up`` writes it there).
ADMIN_KEY_FILE = "gateway-admin-key"
#: Where a deployment's subject-key secret lives when no process is given one.
SUBJECT_SECRET_FILE = "subject-key-secret"


def shared_secret(path: Path, what: str) -> str:
    """The secret in ``path``, created (0600, 32 random bytes as hex) if there is none yet: one file that every
    process of a deployment reads the same secret from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written whole, then linked into place: a process starting beside this one never reads it half-written,
        # and whichever links first wins (``link`` refuses an existing name).
        fd, draft = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(draft)
    secret = path.read_text().strip()
    if not secret:
        raise ConfigError(f"the {what} file {path} is empty")
    return secret


def admin_key(explicit: SecretStr | None, file: Path | None) -> str:
    """The gateway's admin credential: given, else read from ``file`` (default $ADAPTLOOP_HOME/gateway-admin-key),
    created there if missing."""
    if explicit is not None:  # at least 16 characters: the settings' ``Secret`` type checks it
        return explicit.get_secret_value()
    return shared_secret(file or DEFAULT_HOME / ADMIN_KEY_FILE, "admin key")


def bearer_header(key: SecretStr | None) -> dict[str, str]:
    """The header a vLLM started with an API key wants on its /v1 calls (load, unload, completions)."""
    return {"authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}
