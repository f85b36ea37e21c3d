"""The compose file and Dockerfiles are consistent with the code (no Docker engine here).

Checks what `docker compose config` would not: that every service command is a real
`specedge` subcommand, every SPECEDGE_* variable is one a flag reads, every mounted file
exists. When a `docker compose` plugin is present, its own validation runs too.
"""

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from typer.main import get_command

from specedge.cli import app
from specedge.metrics import GatewayMetrics, SchedulerMetrics, VerifierMetrics
from tests.conftest import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def cli_envvars() -> set[str]:
    root = get_command(app)
    names = set()
    for command in root.commands.values():
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if envvar:
                names.add(envvar)
    return names


def test_every_service_runs_a_real_subcommand():
    commands = set(get_command(app).commands)
    roles = set()
    for name, service in COMPOSE["services"].items():
        assert "image" in service or "build" in service, name
        cmd = service.get("command")
        if cmd and cmd[0] == "specedge":
            assert cmd[1] in commands, (name, cmd)
            roles.add(cmd[1])
    assert roles >= {"gateway", "scheduler", "verifier", "edge-agent"}


def test_every_specedge_variable_is_read_by_a_flag():
    known = cli_envvars() | {"SPECEDGE_MODELS_DIR"}
    for name, service in COMPOSE["services"].items():
        for var in service.get("environment", {}):
            if var.startswith("SPECEDGE_"):
                assert var in known, (name, var)
    example = (REPO / ".env.example").read_text()
    for var in re.findall(r"^#? ?(SPECEDGE_[A-Z_]+)=", example, re.M):
        assert var in known, var


def test_compose_matches_the_compose_specification_schema():
    """The compose specification's JSON schema, as vendored by check-jsonschema."""
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(REPO / "docker-compose.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_services_read_the_env_file_and_export_traces_to_the_bundled_backend():
    services = COMPOSE["services"]
    for role in ("gateway", "scheduler", "verifier", "server-drafter"):
        assert {"path": ".env", "required": False} in services[role]["env_file"], role
        assert "jaeger:4318" in services[role]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"], role
    assert (REPO / ".env.example").exists()
    assert "--config" in services["jaeger"]["command"]
    assert "0.0.0.0:4318" in (REPO / "services/jaeger/config.yaml").read_text()


def test_dependencies_and_mounted_files_exist():
    for name, service in COMPOSE["services"].items():
        for dep in service.get("depends_on", {}):
            assert dep in COMPOSE["services"], (name, dep)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), (name, source)
        build = service.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).exists()


def test_gpu_verifier_reserves_a_gpu_in_the_gpu_profile():
    gpu = COMPOSE["services"]["verifier-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("dockerfile", ["deploy/Dockerfile", "deploy/Dockerfile.edge-agent"])
def test_dockerfiles_copy_only_what_exists(dockerfile):
    for line in (REPO / dockerfile).read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source


def test_edge_agent_image_has_no_server_side_code():
    lines = (REPO / "deploy/Dockerfile.edge-agent").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.startswith("#"))
    assert "gateway" not in text and "scheduler" not in text and "redis" not in text.lower()


@pytest.mark.skipif(
    not shutil.which("docker")
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="no docker compose plugin on this machine")
def test_docker_compose_config_validates():
    result = subprocess.run(["docker", "compose", "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_service_logs_in_to_nats_with_an_account_the_one_shot_creates():
    services = COMPOSE["services"]
    script = services["nats-auth"]["command"][-1]
    created = {f"specedge-{role}" for role in ("gateway", "scheduler", "verifier")} if "nats-auth init" in script \
        else set()
    created |= {f"edge-{edge}" for edge in re.findall(r"add-edge (\S+)", script)}
    expected = {"gateway": "specedge-gateway", "scheduler": "specedge-scheduler", "verifier": "specedge-verifier",
                "verifier-gpu": "specedge-verifier", "server-drafter": "edge-server-drafter",
                "edge-agent": "edge-demo-edge"}
    for name, account in expected.items():
        assert services[name]["environment"]["SPECEDGE_CREDENTIALS"] == f"/auth/{account}.creds.json", name
        assert account in created, (name, account)
        assert "nats-auth:/auth:ro" in services[name]["volumes"], name
    assert "nats-auth:/etc/nats/auth:ro" in services["nats"]["volumes"]
    assert re.search(r"^include auth/auth.conf$", (REPO / "services/nats/nats.conf").read_text(), re.M)
    assert "--server-side" in script.split("add-edge server-drafter")[1].split("&&")[0]


GRAFANA = REPO / "services/grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards/specedge.json").read_text())


def exported_names() -> set[str]:
    """Every series name the services export, as Prometheus stores them (`_total`, `_bucket`, …)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for metrics in (GatewayMetrics(), SchedulerMetrics(), VerifierMetrics()):
        for family in metrics.registry.collect():
            names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def mount_target(service: str, source: str) -> str:
    return next(v.split(":")[1] for v in COMPOSE["services"][service]["volumes"] if v.startswith(source + ":"))


def test_grafana_provisions_the_compose_prometheus_and_the_dashboard():
    grafana = COMPOSE["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])  # pinned
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    (prometheus,) = sources
    port = COMPOSE["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]  # the container's port
    assert prometheus["type"] == "prometheus" and prometheus["url"] == f"http://prometheus:{port}"
    assert mount_target("grafana", "./services/grafana/provisioning") == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/specedge.yml").read_text())["providers"]
    assert provider["options"]["path"] == mount_target("grafana", "./services/grafana/dashboards")
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(provider["options"]["path"])
    panels = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
    assert DASHBOARD["uid"] and len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == prometheus["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_the_dashboard_queries_only_metrics_the_services_export():
    exported = exported_names()
    jobs = {job["job_name"] for job in yaml.safe_load(
        (REPO / "services/prometheus/prometheus.yml").read_text())["scrape_configs"]}
    used = set()
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            used |= set(re.findall(r"specedge:[A-Za-z0-9_]+", target["expr"]))
            assert set(re.findall(r'job="([^"]+)"', target["expr"])) <= jobs, target["expr"]
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"
    # …and it covers the list
    for name in ("spec_decode_num_accepted_tokens_total", "spec_decode_num_draft_tokens_total",
                 "spec_decode_num_drafts_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
                 "num_requests_running", "num_requests_waiting", "verifier_busy_fraction",
                 "edge_round_trip_seconds_bucket", "edge_drafting_seconds_bucket", "rejected_messages_total",
                 "server_side_fallbacks_total"):
        assert "specedge:" + name in used, name


def test_no_default_secrets_and_nothing_private_is_published():
    """Secrets must be set (`${VAR:?…}`: compose refuses to start without them); Redis wants a
    password; the observability UIs listen on 127.0.0.1 unless asked; edges reach only NATS."""
    text = (REPO / "docker-compose.yml").read_text()
    for secret in ("SPECEDGE_API_KEY", "REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert f"${{{secret}:?" in text and f"${{{secret}:-" not in text, secret
    env_example = (REPO / ".env.example").read_text()
    for secret in ("SPECEDGE_API_KEY", "REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(rf"^{secret}=$", env_example, re.M), secret  # empty: the operator picks one
    services = COMPOSE["services"]
    redis_conf = (REPO / "services/redis/redis.conf").read_text()
    assert "protected-mode yes" in redis_conf and "--requirepass" in " ".join(services["redis"]["command"])
    assert services["redis"].get("ports") is None
    for role in ("gateway", "scheduler", "verifier", "server-drafter"):
        assert ":${REDIS_PASSWORD:?" in services[role]["environment"]["SPECEDGE_REDIS_URL"], role
    for name in ("jaeger", "prometheus", "grafana"):
        for port in services[name]["ports"]:
            assert port.startswith("${OBSERVABILITY_BIND:-127.0.0.1}:"), (name, port)
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"nats", "gateway", "jaeger", "prometheus", "grafana"}
    edge = services["edge-agent"]
    assert edge["networks"] == ["edge"] and edge["env_file"] == []
    assert not any("REDIS" in key or "OTEL" in key for key in edge["environment"])
    on_edge_network = {name for name, service in services.items() if "edge" in service.get("networks", [])}
    assert on_edge_network == {"nats", "edge-agent"}
