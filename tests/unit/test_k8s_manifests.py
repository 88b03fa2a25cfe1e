"""deploy/k8s: every manifest parses and validates against the Kubernetes schemas (kubernetes-validate
carries them; no cluster, no network), the KubeRay CRs have their required fields and their pod
templates validate as pod templates, every reference resolves, and each process's settings accept
the environment its pod gets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from adaptloop.errors import ConfigError
from adaptloop.tasks import FILE_ENV, INLINE_ENV, parse_catalogue
from adaptloop.settings import (ErasureSettings, GatewaySettings, KafkaSettings, ModelSettings, ServeSettings, StreamsSettings, Topics,
                                TrainerSettings)

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSION = kubernetes_validate.latest_version()
SETTINGS_BY_PREFIX = {"ADAPTLOOP_KAFKA_": KafkaSettings, "ADAPTLOOP_TOPICS_": Topics, "ADAPTLOOP_MODEL_": ModelSettings,
                      "ADAPTLOOP_STREAMS_": StreamsSettings, "ADAPTLOOP_TRAINER_": TrainerSettings,
                      "ADAPTLOOP_SERVE_": ServeSettings, "ADAPTLOOP_GATEWAY_": GatewaySettings,
                      "ADAPTLOOP_ERASURE_": ErasureSettings}
SETTINGS_BY_COMMAND = {"streams": StreamsSettings, "trainer": TrainerSettings, "serve": ServeSettings,
                       "gateway": GatewaySettings}
#: Read by adaptloop.tasks.load_catalogue, not a settings class: every process that judges, trains or routes.
CATALOGUE_VARIABLES = {FILE_ENV, INLINE_ENV}
CATALOGUE_READERS = {"streams", "trainer", "gateway"}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((str(path.relative_to(K8S)), doc))
    return docs


def pod_templates(doc: dict) -> list[dict]:
    """Every pod template in a workload or a KubeRay CR."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet"):
        return [spec["template"]]
    if kind == "Job":
        return [spec["template"]]
    if kind == "RayCluster":
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    if kind == "RayJob":
        return pod_templates({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
    return []


def containers(doc: dict) -> list[dict]:
    return [c for t in pod_templates(doc) for c in t["spec"]["containers"]]


#: Strimzi's KafkaUser (v1beta2) simple-authorization vocabulary.
ACL_OPERATIONS = {"Read", "Write", "Create", "Delete", "Alter", "Describe", "ClusterAction", "AlterConfigs",
                  "DescribeConfigs", "IdempotentWrite", "All"}


def check_kafka_user(doc: dict) -> None:
    """No Strimzi schema ships with kubernetes-validate: the fields Strimzi requires, and its ACL vocabulary."""
    assert doc["kind"] == "KafkaUser" and doc["metadata"]["labels"]["strimzi.io/cluster"]
    assert doc["spec"]["authentication"]["type"] == "scram-sha-512"
    assert doc["spec"]["authorization"]["type"] == "simple"
    for acl in doc["spec"]["authorization"]["acls"]:
        assert acl["resource"]["type"] in {"topic", "group", "cluster", "transactionalId"}
        assert acl["resource"]["patternType"] in {"literal", "prefix"} and acl["resource"]["name"]
        assert set(acl["operations"]) <= ACL_OPERATIONS and acl["operations"]


def test_kustomization_lists_every_top_level_manifest_and_nothing_else():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    top_level = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == top_level
    assert kustomization["namespace"] == "adaptloop"
    images = {c["image"] for _, doc in documents() for c in containers(doc)}
    assert images <= {i["name"] for i in kustomization["images"]}


@pytest.mark.parametrize("source,doc", documents(), ids=lambda v: v if isinstance(v, str) else v.get("kind", "?"))
def test_manifest_validates(source, doc):
    if doc["apiVersion"].startswith("kafka.strimzi.io/"):
        check_kafka_user(doc)
        return
    assert doc["metadata"].get("namespace") == "adaptloop" or doc["kind"] == "Namespace", source
    if doc["apiVersion"].startswith("ray.io/"):
        check_kuberay(doc)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def check_kuberay(doc: dict) -> None:
    """kubernetes-validate has no schema for CRDs: the fields KubeRay requires, then each pod template
    validated as a core PodTemplate (strict)."""
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].startswith("python -m adaptloop.cli trainer")
        cluster = spec["rayClusterSpec"]
    else:
        cluster = spec
    assert isinstance(cluster["rayVersion"], str)
    assert isinstance(cluster["headGroupSpec"]["rayStartParams"], dict)
    for group in cluster.get("workerGroupSpecs", []):
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # Ray Client needs the same Ray on both sides: the cluster runs the pinned version.
    pinned = [line for line in (K8S.parents[0] / "requirements.txt").read_text().splitlines()
              if line.startswith("ray[")]
    assert pinned and pinned[0].endswith("==" + cluster["rayVersion"])
    for template in pod_templates(doc):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": "check", "namespace": "adaptloop"},
                                      "template": template}, K8S_VERSION, strict=True)


def test_every_reference_resolves():
    docs = [doc for _, doc in documents()]
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d.get("stringData", d.get("data", {})) for d in docs if d["kind"] == "Secret"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in docs:
        for template in pod_templates(doc):
            pod = template["spec"]
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            templates = {t["metadata"]["name"] for t in doc.get("spec", {}).get("volumeClaimTemplates", [])}
            for volume in volumes.values():
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
                if "secret" in volume:
                    assert volume["secret"]["secretName"] in secrets
            for container in pod["containers"]:
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes or mount["name"] in templates, (doc["kind"], mount)
                for source in container.get("envFrom", []):
                    assert source["configMapRef"]["name"] in config_maps
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets[ref["name"]], ref
    # Services select a workload's pods and name ports its containers expose.
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        selected = [d for d in docs for t in pod_templates(d)
                    if selector.items() <= t.get("metadata", {}).get("labels", {}).items()]
        assert selected, service["metadata"]["name"]
        ports = {p["name"] for d in selected for c in containers(d) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)


def container_env(container: dict, config_maps: dict, secrets: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= config_maps[source["configMapRef"]["name"]]
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        env[item["name"]] = secrets[ref["name"]][ref["key"]] if ref else item["value"]
    return env


def test_every_adaptloop_variable_is_a_setting_and_each_process_accepts_its_pod_env(monkeypatch):
    docs = [doc for _, doc in documents()]
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    shipped = {d["metadata"]["name"]: d["stringData"] for d in docs if d["kind"] == "Secret"}
    filled = {name: {k: f"test-{k}".ljust(24, "0") for k in data} for name, data in shipped.items()}  # keys >= 16
    checked = set()
    for doc in docs:
        for container in containers(doc):
            env = container_env(container, config_maps, filled)
            for name in env:
                if name.startswith("ADAPTLOOP_") and name not in CATALOGUE_VARIABLES:
                    prefix = next((p for p in SETTINGS_BY_PREFIX if name.startswith(p)), None)
                    assert prefix, f"{name}: no settings class reads it"
                    assert name[len(prefix):].lower() in SETTINGS_BY_PREFIX[prefix].model_fields, name
            command = container.get("command", [])
            if command[:3] != ["python", "-m", "adaptloop.cli"]:
                continue
            settings_class = SETTINGS_BY_COMMAND[command[3]]
            # The CA file the settings name is the secret the container mounts.
            ca = Path(env["ADAPTLOOP_KAFKA_SSL_CA_LOCATION"])
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for t in pod_templates(doc) for v in t["spec"]["volumes"]}
            assert volumes[mounts[str(ca.parent)]]["secret"]["secretName"] == "adaptloop-kafka-ca"
            if command[3] in CATALOGUE_READERS:  # the catalogue file is the mounted ConfigMap, and it parses
                catalogue = Path(env[FILE_ENV])
                config_map = volumes[mounts[str(catalogue.parent)]]["configMap"]["name"]
                parse_catalogue(config_maps[config_map][catalogue.name], f"{config_map}/{catalogue.name}")
            with monkeypatch.context() as m:
                for name in [n for n in os.environ if n.startswith("ADAPTLOOP_") and n != "ADAPTLOOP_HOME"]:
                    m.delenv(name)
                for name, value in env.items():
                    m.setenv(name, value)
                settings = settings_class()
                kafka = settings.kafka
                assert (kafka.embedded, kafka.idempotence, kafka.security_protocol) == (False, True, "SASL_SSL")
                assert kafka.sasl_mechanism.startswith("SCRAM") and kafka.schema_registry_url.startswith("https://")
                assert kafka.client_config()["sasl.password"] == "test-password".ljust(24, "0")
                # The shipped secrets are empty on purpose: a process refuses to start, with the reason.
                m.setenv("ADAPTLOOP_KAFKA_SASL_PASSWORD", "")
                with pytest.raises(ConfigError, match="SASL needs"):
                    KafkaSettings()
            checked.add(command[3])
    assert checked == set(SETTINGS_BY_COMMAND)


def test_the_gateway_sees_each_vllm_replica_on_its_own_and_only_it_reaches_them():
    """vLLM's replicas are a StatefulSet behind a headless Service, and the gateway lists every pod by name, so
    "route only to replicas that report the adapter loaded" holds; a NetworkPolicy lets only the gateway in."""
    docs = [doc for _, doc in documents()]
    serve = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "adaptloop-serve")
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "adaptloop-serve")
    assert service["spec"]["clusterIP"] == "None" and serve["spec"]["serviceName"] == "adaptloop-serve"
    gateway = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "adaptloop-gateway")
    env = {e["name"]: e.get("value") for e in containers(gateway)[0]["env"]}
    replicas = json.loads(env["ADAPTLOOP_GATEWAY_REPLICAS"])
    assert [r["vllm_url"] for r in replicas] == [f"http://adaptloop-serve-{n}.adaptloop-serve:18000"
                                                 for n in range(serve["spec"]["replicas"])]
    assert "ADAPTLOOP_GATEWAY_VLLM_URL" not in env
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "adaptloop-serve")
    assert policy["spec"]["podSelector"]["matchLabels"] == serve["spec"]["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    assert [f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in rule["from"]] == ["gateway"]
    # ... and vLLM takes one key, which the sidecar (same pod, same env) and every gateway send.
    key_refs = {container["name"]: {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
                                    if "VLLM_API_KEY" in e["name"]} for container in containers(serve) + containers(gateway)}
    assert key_refs == {"vllm": {"ADAPTLOOP_SERVE_VLLM_API_KEY": {"name": "adaptloop-vllm", "key": "key"}},
                        "gateway": {"ADAPTLOOP_GATEWAY_VLLM_API_KEY": {"name": "adaptloop-vllm", "key": "key"}}}


#: The topics each component's code produces to (``topics.name(...)`` in its modules; curation also writes its
#: internal topics, under its app id's prefix); the operator's tools are the canary and forget.
WRITES = {"gateway": {"interactions", "outcomes"}, "streams": {"curated", "dead_letters", "training_requests"},
          "trainer": {"releases", "dead_letters"}, "serve": {"serving_status"},
          "operator": {"releases", "erasures", "training_requests"}}


def test_each_component_is_its_own_kafka_principal_allowed_only_its_own_writes():
    docs = [doc for _, doc in documents()]
    users = {d["metadata"]["name"]: d["spec"]["authorization"]["acls"] for d in docs if d["kind"] == "KafkaUser"}
    for doc in docs:
        for container in containers(doc):
            command = container.get("command", [])
            if command[:3] != ["python", "-m", "adaptloop.cli"]:
                continue
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
            assert refs["ADAPTLOOP_KAFKA_SASL_USERNAME"] == refs["ADAPTLOOP_KAFKA_SASL_PASSWORD"] == \
                f"adaptloop-kafka-{command[3]}", (command, refs)
    topics = Topics()
    for component, writes in WRITES.items():
        acls = users[f"adaptloop-{component}"]
        written = {a["resource"]["name"] for a in acls if a["resource"]["type"] == "topic"
                   and a["resource"]["patternType"] == "literal" and "Write" in a["operations"]}
        assert written == {topics.name(w) for w in writes}, component
    may_release = {name for name, acls in users.items() for a in acls
                   if a["resource"]["name"] == topics.name("releases") and "Write" in a["operations"]}
    assert may_release == {"adaptloop-trainer", "adaptloop-operator"}
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "adaptloop-config")
    assert json.loads(config["data"]["ADAPTLOOP_STREAMS_TENANTS"])  # curation accepts the configured tenants only
