"""Gateway API keys: hashed at rest, one tenant per key, clear errors."""

from __future__ import annotations

import json

import pytest

from adaptloop.artifacts import base_model_digest
from adaptloop.errors import ArtifactError, AuthError, ConfigError
from adaptloop.serving import keys
from adaptloop.serving.keys import KeyStore, add_to_key_file, generate_key
from adaptloop.settings import GatewaySettings


def test_key_file_keeps_only_hashes_and_maps_each_key_to_its_tenant(tmp_path):
    file = tmp_path / "keys.json"
    acme, entry = generate_key("acme")
    add_to_key_file(file, entry)
    assert keys.main(["add", "globex", "--file", str(file)]) == 0
    text = file.read_text()
    assert acme not in text and acme.split("_", 2)[2] not in text  # the whole secret (it may hold "_")
    assert oct(file.stat().st_mode & 0o777) == "0o600"
    store = KeyStore.load(file)
    assert len(store) == 2 and store.tenants() == {"acme", "globex"}
    assert store.tenant_of(acme) == "acme"
    for bad in (None, "", "sk-nothing", acme + "x", acme.replace(acme[4:12], "00000000"), "alk_x"):
        with pytest.raises(AuthError):
            store.tenant_of(bad)


def test_a_revoked_key_stops_working_without_a_restart_and_add_keeps_every_other_entry(tmp_path, monkeypatch, capsys):
    file = tmp_path / "keys.json"
    acme, entry = generate_key("acme")
    add_to_key_file(file, entry)
    rows = json.loads(file.read_text())
    rows["keys"][0]["note"] = "billing team's key"  # a field adaptloop does not know is kept, as written
    file.write_text(json.dumps(rows))
    clock = [1000.0]
    monkeypatch.setattr(keys.time, "monotonic", lambda: clock[0])
    store = KeyStore.load(file, plain=keys.plain_setting({"dev": generate_key("dev")[0]}))
    assert keys.main(["add", "globex", "--file", str(file)]) == 0
    globex = capsys.readouterr().out.strip()
    assert json.loads(file.read_text())["keys"][0] == rows["keys"][0]
    clock[0] += keys.RELOAD_CHECK_S
    assert store.tenant_of(globex) == "globex" and store.tenant_of(acme) == "acme"  # the new key, no restart
    assert keys.main(["revoke", acme, "--file", str(file)]) == 0  # the whole key, or just its id
    assert acme not in capsys.readouterr().out  # never echoed
    assert store.tenant_of(acme) == "acme"  # checked at most once per RELOAD_CHECK_S ...
    clock[0] += keys.RELOAD_CHECK_S
    with pytest.raises(AuthError):  # ... then refused
        store.tenant_of(acme)
    assert store.tenants() == {"globex", "dev"}
    file.write_text("{half written")
    clock[0] += keys.RELOAD_CHECK_S
    assert store.tenant_of(globex) == "globex"  # a broken file keeps the keys the gateway had
    assert keys.main(["revoke", "deadbeef", "--file", str(tmp_path / "other.json")]) == 1


def test_concurrent_adds_lose_no_key(tmp_path):
    """Each ``keys add`` rewrites the file under an exclusive lock: none overwrites another's entry."""
    import subprocess
    import sys

    file = tmp_path / "keys.json"
    adds = [subprocess.Popen([sys.executable, "-m", "adaptloop.serving.keys", "add", f"t{n}", "--file", str(file)],
                             stdout=subprocess.PIPE) for n in range(8)]
    assert all(p.wait(timeout=60) == 0 for p in adds)
    assert KeyStore.load(file).tenants() == {f"t{n}" for n in range(8)}


def test_plain_dev_keys_and_malformed_configuration():
    plain = keys.plain_setting(keys.dev_keys(["acme", "default"]))
    store = KeyStore.load(plain=plain)
    assert store.tenants() == {"acme", "default"}
    with pytest.raises(ConfigError):
        KeyStore.load(plain="acme:not-a-pair")
    with pytest.raises(ConfigError):
        KeyStore.load(plain="acme=sk-123")
    with pytest.raises(ConfigError):
        generate_key("a/b")


def test_gateway_settings_keep_keys_secret_and_list_replicas(monkeypatch):
    monkeypatch.setenv("ADAPTLOOP_GATEWAY_API_KEYS", "acme=alk_1_s")
    monkeypatch.setenv("ADAPTLOOP_GATEWAY_REPLICAS", json.dumps([{"vllm_url": "http://a:1", "sidecar_url": "http://a:2"},
                                                                 {"vllm_url": "http://b:1", "sidecar_url": "http://b:2"}]))
    settings = GatewaySettings()
    assert "alk_1_s" not in repr(settings)
    assert [r.vllm_url for r in settings.replica_list()] == ["http://a:1", "http://b:1"]
    monkeypatch.delenv("ADAPTLOOP_GATEWAY_REPLICAS")
    assert [r.vllm_url for r in GatewaySettings().replica_list()] == ["http://127.0.0.1:18000"]


def test_base_model_digest_reads_config_and_weight_sizes(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    first = base_model_digest(tmp_path)
    assert first.startswith("sha256:") and base_model_digest(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert base_model_digest(tmp_path) != first
    with pytest.raises(ArtifactError):
        base_model_digest(tmp_path / "missing")


def test_the_shipped_production_serving_configs_parse(monkeypatch):
    """deploy/serving-env/*.env as a shell would source them, into the settings of each process."""
    import shlex
    from pathlib import Path

    from adaptloop.settings import CanarySettings, ServeSettings

    folder = Path(__file__).resolve().parents[2] / "deploy" / "serving-env"
    kinds = {"replica-1": ServeSettings, "replica-2": ServeSettings, "gateway": GatewaySettings, "canary": CanarySettings}
    for name, kind in kinds.items():
        with monkeypatch.context() as m:
            for line in (folder / f"{name}.env").read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    m.setenv(key, shlex.split(value)[0])
            m.setenv("ADAPTLOOP_KAFKA_SASL_PASSWORD", "from-the-secret-store")
            settings = kind()
        if kind is GatewaySettings:
            assert len(settings.replica_list()) == 2 and settings.canary_share == 0.1
        if kind is ServeSettings:
            assert settings.dtype == "bfloat16" and not settings.enforce_eager and settings.vllm_args
        if kind is CanarySettings:
            assert len(settings.gateway_urls) == 2
