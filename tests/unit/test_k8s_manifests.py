"""The Kubernetes deployment (`deploy/k8s`, kustomize): every object valid against the
Kubernetes API's schemas (kubernetes-validate, offline), and the properties an operator
relies on — a three-node NATS cluster, Redis with a replica and Sentinels, readiness where
it means something, GPUs for verifiers, edges reaching only NATS, no default password.
Rendered by `kustomize build` too where kustomize (or kubectl) is installed."""

import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
VERSION = kubernetes_validate.latest_version()


def documents(path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in documents(K8S / name)]


def one(kind: str, name: str) -> dict:
    found = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.mark.parametrize("path", sorted([*K8S.glob("*.yaml"), *K8S.glob("examples/*.yaml")]),
                         ids=lambda p: p.name)
def test_every_object_is_valid_against_the_kubernetes_schemas(path):
    for doc in documents(path):
        if doc.get("kind") == "Kustomization":
            continue
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_nats_is_a_three_node_cluster_with_the_accounts_secret():
    nats = one("StatefulSet", "nats")
    assert nats["spec"]["replicas"] == 3
    conf = one("ConfigMap", "nats-config")["data"]["nats.conf"]
    assert all(f"nats://nats-{i}.nats-cluster:6222" in conf for i in range(3)) and "include auth/auth.conf" in conf
    assert "jetstream" not in conf  # nothing on the bus is durable: Redis is
    volumes = {v["name"]: v for v in nats["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "nats-auth"


def test_redis_has_a_replica_and_three_sentinels_and_services_find_the_primary_through_them():
    assert one("StatefulSet", "redis")["spec"]["replicas"] == 2
    assert one("StatefulSet", "redis-sentinel")["spec"]["replicas"] == 3
    assert "sentinel monitor specedge redis-0.redis 6379 2" in one("ConfigMap", "redis-config")["data"]["sentinel.conf"]
    for name in ("gateway", "scheduler", "verifier"):
        values = env(containers(one("Deployment", name))[0])
        redis = values["SPECEDGE_REDIS_URL"]
        assert redis.startswith("redis+sentinel://:$(REDIS_PASSWORD)@") and redis.endswith("/specedge/0"), name
        assert redis.count(":26379") == 3
        assert values["SPECEDGE_NATS_URL"].count("nats://") == 3, name  # every node: reconnect to a survivor


def test_services_are_ready_when_they_can_serve_and_verifiers_get_a_gpu_each():
    gateway = containers(one("Deployment", "gateway"))[0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"  # 503 until a verifier registers
    assert one("Deployment", "gateway")["spec"]["replicas"] >= 2
    hpa = one("HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway" and hpa["spec"]["minReplicas"] >= 2
    assert one("Deployment", "scheduler")["spec"]["replicas"] == 2
    verifier = containers(one("Deployment", "verifier"))[0]
    assert verifier["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert verifier["readinessProbe"]["httpGet"]["port"] == "metrics"  # served once the model is loaded
    assert "--server-side" in containers(one("Deployment", "server-drafter"))[0]["command"]


def test_edges_reach_only_nats_and_the_rest_is_closed_by_default():
    policies = {o["metadata"]["name"]: o for o in objects() if o["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"]["spec"]["podSelector"] == {}
    redis = policies["redis-from-the-server-side"]["spec"]["ingress"][0]["from"][0]["podSelector"]
    assert redis["matchLabels"] == {"specedge.io/server-side": "true"}
    example = {d["kind"]: d for d in documents(K8S / "examples" / "edge-agent.yaml")}
    egress = example["NetworkPolicy"]["spec"]["egress"]
    assert {p["port"] for rule in egress for p in rule["ports"]} == {4222, 53}
    assert example["Deployment"]["spec"]["template"]["metadata"]["labels"]["specedge.io/edge"] == "true"


def test_no_default_secrets():
    """Credentials come from Secrets the operator creates; none is defined here, and no
    environment variable carries a literal password."""
    assert not [o for o in objects() if o["kind"] == "Secret"]
    for o in objects():
        if o["kind"] in ("Deployment", "StatefulSet"):
            for c in containers(o):
                for e in c.get("env", []):
                    if "PASSWORD" in e["name"]:
                        assert "valueFrom" in e and "value" not in e, (o["metadata"]["name"], e)


@pytest.mark.skipif(not (shutil.which("kustomize") or shutil.which("kubectl")), reason="no kustomize or kubectl")
def test_kustomize_builds_it():
    command = ["kustomize", "build"] if shutil.which("kustomize") else ["kubectl", "kustomize"]
    built = subprocess.run([*command, str(K8S)], capture_output=True, text=True, check=True).stdout
    rendered = [d for d in yaml.safe_load_all(built) if d]
    assert len(rendered) == len(objects()) and all(d["metadata"].get("namespace", "specedge") == "specedge"
                                                   for d in rendered)


def test_edges_join_with_a_key_through_the_auth_callout():
    callout = one("Deployment", "auth-callout")
    (container,) = callout["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["specedge", "auth-callout"] and "--issuer" in container["command"]
    (auth,) = [v for v in callout["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth"]
    assert auth["secret"]["secretName"] == "nats-auth"
    assert {i["key"] for i in auth["secret"]["items"]} == {
        "specedge-auth-callout.creds.json", "specedge-system.creds.json", "issuer.nk"}
    assert callout["spec"]["replicas"] >= 2  # a queue group: either answers
    (edge,) = [d for d in documents(K8S / "examples" / "edge-agent.yaml") if d["kind"] == "Deployment"]
    env = {e["name"]: e for e in edge["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPECEDGE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "edge-key"
    assert "SPECEDGE_CREDENTIALS" not in env
