"""Deployment files (docker-compose.yml, docker/) checked statically: CI builds and runs no containers.

What would otherwise only fail at ``docker compose up`` on someone's GPU box: unpinned images, a port published
beyond loopback, a ``PREFIXGATE_*`` variable the settings do not know, a dependency that never waits for health,
a dashboard querying a metric the gateway does not export, an engine image copying a hook file that moved.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from engines import hooks
from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.settings import ENV_PREFIX, OPTIONS, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKER = ROOT / "docker"
GATEWAY_DOCKERFILE = DOCKER / "Dockerfile"
ENGINE_DOCKERFILES = {"vllm": DOCKER / "vllm.Dockerfile", "sglang": DOCKER / "sglang.Dockerfile"}
PROMETHEUS = DOCKER / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "prefixgate.json"
HOOK_DIR = ROOT / "engines" / "hooks"

ENGINE_PROFILES = ("vllm", "sglang", "llamacpp")
SETTINGS_VARS = {ENV_PREFIX + name.upper() for name in OPTIONS}
HOOK_VARS = {
    *hooks.INDEX_URL_VARS,
    hooks.TOKEN_VAR,
    *(var for f in HOOK_DIR.glob("*.py") for var in re.findall(r"\"(PREFIXGATE_HOOK_[A-Z0-9_]+)\"", f.read_text())),
}
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")
_METRIC = re.compile(r"\bprefixgate_[a-z0-9_]+")


# ---------------------------------------------------------------------------------------------------- helpers


def _defaults(text: str) -> str:
    """Compose interpolation with an empty environment: ``${X:-default}`` gives ``default``, ``${X}`` nothing."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict) and found
    return found


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): _defaults("" if v is None else str(v)) for k, v in env.items()}


def _profiles(service: dict[str, Any]) -> set[str]:
    return set(service.get("profiles") or ())


def _words(value: Any) -> list[str]:
    if value is None:
        return []
    return [_defaults(str(v)) for v in value] if isinstance(value, list) else _defaults(str(value)).split()


def _gateways(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services that run ``prefixgate serve`` (the gateway image with its own entry point)."""
    return {
        name: svc
        for name, svc in services.items()
        if svc.get("build", {}).get("dockerfile") == "docker/Dockerfile" and "entrypoint" not in svc
    }


def _instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile as (INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def _base_images(path: Path) -> Iterator[str]:
    """Every external image a Dockerfile builds FROM, ``ARG`` defaults substituted, stage names skipped."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    for keyword, rest in _instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args.setdefault(name.strip(), value.strip().strip("\"'"))
        elif keyword == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), parts[0])
            if len(parts) >= 3 and parts[1].lower() == "as":
                stages.add(parts[2])
            if image not in stages:
                yield image


def _pinned(image: str) -> bool:
    """A digest, or a tag that names a version: not ``latest``, not a moving tag such as llama.cpp's ``server``."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and any(ch.isdigit() for ch in tag)


def _exported_metric_names() -> set[str]:
    """Every sample name the gateway's registry can export, including labelled metrics not yet observed."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    app = create_app(load_settings(environ={}))  # the app's registry also holds the live index's collector
    metrics: Metrics = app.state.metrics
    for metric in metrics.registry.collect():
        names.update(metric.name + suffix for suffix in suffixes.get(metric.type, ("",)))
        names.update(sample.name for sample in metric.samples)
    return names


def _strings_under(node: Any, keys: set[str]) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            yield from _strings_under(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _strings_under(item, keys)


# ---------------------------------------------------------------------------------------------------- compose


def test_default_set_is_gateway_and_sim(services: dict[str, dict[str, Any]]) -> None:
    assert {name for name, svc in services.items() if not _profiles(svc)} == {"gateway", "sim"}


def test_profiles_exist(services: dict[str, dict[str, Any]]) -> None:
    profiles = set().union(*(_profiles(svc) for svc in services.values()))
    assert {*ENGINE_PROFILES, "monitoring"} <= profiles


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert "image" in svc, f"{name}: no image (a build without one is tagged by Compose, unpinned)"
        image = _defaults(svc["image"])
        assert _pinned(image), f"{name}: image {image!r} is not pinned to a version"
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name


def test_published_ports_bind_loopback(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert svc.get("network_mode") != "host", name
        for port in svc.get("ports") or ():
            if isinstance(port, dict):
                host_ip = _defaults(str(port.get("host_ip", "")))
            else:
                parts = _defaults(str(port)).split(":")
                host_ip = parts[0] if len(parts) == 3 else ""
            assert host_ip == "127.0.0.1", f"{name}: {port!r} is published beyond the host's loopback"


def test_named_volumes_are_declared_and_bind_sources_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes") or ():
            source = _defaults(volume).split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith(("./", "/", "~")):
                if source != "./models":  # the user's model files (docs/deployment.md)
                    assert (ROOT / source).exists(), f"{name}: bind source {source} is not in the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_prefixgate_variables_exist(services: dict[str, dict[str, Any]]) -> None:
    for name in re.findall(r"\$\{(PREFIXGATE_\w+)", COMPOSE.read_text()):
        assert name in SETTINGS_VARS | HOOK_VARS, f"${{{name}}} is neither a setting nor a hook variable"
    gateways = _gateways(services)
    for name, svc in services.items():
        used = {key for key in _environment(svc) if key.startswith(ENV_PREFIX)}
        known = SETTINGS_VARS if name in gateways else HOOK_VARS
        assert used <= known, f"{name}: unknown {sorted(used - known)}"


def test_gateway_environments_load(services: dict[str, dict[str, Any]]) -> None:
    """Each gateway's settings are valid and its upstream is a service of the same stack."""
    gateways = _gateways(services)
    assert gateways
    for name, svc in gateways.items():
        settings = load_settings(environ=_environment(svc))
        assert settings.upstream, name
        for _, url in settings.upstreams:
            host = urlsplit(url).hostname
            assert host in services, f"{name}: upstream {url} is not a service"
            assert _profiles(services[host]) == _profiles(svc), f"{name}: upstream {host} is in another profile"
        profile = next(iter(_profiles(svc)), None)
        if profile in ENGINE_PROFILES:
            assert settings.engine == profile, name


def test_healthchecks_and_healthy_dependencies(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        check = svc.get("healthcheck")
        assert check and not check.get("disable") and check.get("test") not in (None, ["NONE"]), name
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on must use the long form with a condition"
        for dependency, spec in depends.items():
            assert dependency in services, f"{name}: depends on unknown {dependency}"
            assert spec.get("condition") == "service_healthy", f"{name} -> {dependency}"
            assert _profiles(services[dependency]) <= _profiles(svc), f"{name} -> {dependency}: other profile"


def test_each_engine_profile_has_a_gateway(services: dict[str, dict[str, Any]]) -> None:
    gateways = _gateways(services)
    for profile in ENGINE_PROFILES:
        assert [g for g in gateways.values() if _profiles(g) == {profile}], profile


def test_sim_stack_wiring(services: dict[str, dict[str, Any]]) -> None:
    sim = services["sim"]
    assert _words(sim["entrypoint"])[-1] == "sim-engine"
    command = _words(sim["command"])
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8766"
    assert command[command.index("--evict-url") + 1] == "http://gateway:8765/evict"
    assert "--evict-token" not in command  # a flag would show the token in ps
    assert "PREFIXGATE_ADMIN_TOKEN" in _environment(sim)
    assert _environment(services["gateway"])["PREFIXGATE_UPSTREAM"] == "http://sim:8766"


@pytest.mark.parametrize(
    ("engine", "flags"),
    [("vllm", ["--enable-prompt-tokens-details"]), ("sglang", ["--enable-cache-report"])],
)
def test_gpu_engines_report_cache_and_evictions(
    services: dict[str, dict[str, Any]], engine: str, flags: list[str]
) -> None:
    svc = services[engine]
    assert _profiles(svc) == {engine}
    assert svc["build"]["dockerfile"] == f"docker/{engine}.Dockerfile"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device.get("capabilities", ()) for device in devices)
    command = _words(svc["command"])
    assert all(flag in command for flag in flags), command
    assert "--disable-radix-cache" not in command and "--no-enable-prefix-caching" not in command
    # Eviction feedback: the hook reports to this stack's gateway, or the gateway subscribes to KV events.
    gateway = next(name for name, g in _gateways(services).items() if _profiles(g) == {engine})
    index_url = _environment(svc).get("PREFIXGATE_INDEX_URL", "")
    kv_events = _environment(services[gateway]).get("PREFIXGATE_KV_EVENTS_ENDPOINT", "")
    assert index_url == f"http://{gateway}:8765" or kv_events, engine


def test_llamacpp_stack(services: dict[str, dict[str, Any]]) -> None:
    svc = services["llamacpp"]
    assert _defaults(svc["image"]).startswith("ghcr.io/ggml-org/llama.cpp:server-b")
    assert "./models:/models:ro" in svc["volumes"]
    command = _words(svc["command"])
    assert command[command.index("-np") + 1] == "4"
    assert command[command.index("--cache-ram") + 1] == "0"
    assert "--no-slots" not in command
    assert command[command.index("-m") + 1].startswith("/models/")


# ---------------------------------------------------------------------------------------------------- images


def test_gateway_dockerfile() -> None:
    instructions = _instructions(GATEWAY_DOCKERFILE)
    text = GATEWAY_DOCKERFILE.read_text()
    assert all(_pinned(image) and image.startswith("python:3.11") for image in _base_images(GATEWAY_DOCKERFILE))
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the gateway must not run as root"
    healthchecks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert healthchecks and "/health" in healthchecks[-1] and "urllib" in healthchecks[-1]
    assert ("EXPOSE", "8765") in instructions
    assert ("ENTRYPOINT", '["prefixgate", "serve"]') in instructions
    assert 'pip install -c constraints.txt ".[events,state,tokenizer]"' in text and "[dev]" not in text
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert "PREFIXGATE_HOST=0.0.0.0" in env
    assert set(re.findall(r"PREFIXGATE_\w+", text)) <= SETTINGS_VARS


@pytest.mark.parametrize("engine", sorted(ENGINE_DOCKERFILES))
def test_engine_dockerfiles_install_the_hook(engine: str) -> None:
    path = ENGINE_DOCKERFILES[engine]
    instructions = _instructions(path)
    (base,) = list(_base_images(path))
    assert _pinned(base)
    version = base.rpartition(":")[2].removeprefix("v")
    tested = {patch.engine: patch.tested for patch in hooks.PATCHES.values()}
    assert version.startswith(tested[engine]), f"{base} is not a version the hook is tested with"
    copies = [args.split() for keyword, args in instructions if keyword == "COPY"]
    sources = [words[-2] for words in copies]
    assert "engines/hooks/" in sources and (HOOK_DIR / "__main__.py").is_file()
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(r"python3 /tmp/prefixgate_hook --install", runs)
    assert set(re.findall(r"PREFIXGATE_\w+", path.read_text())) <= HOOK_VARS


def test_dockerignore_keeps_what_the_images_copy() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "models"} <= ignored
    for path in (GATEWAY_DOCKERFILE, *ENGINE_DOCKERFILES.values()):
        for keyword, args in _instructions(path):
            if keyword == "COPY" and "--from=" not in args:
                for source in args.split()[:-1]:
                    top = source.split("/")[0]
                    assert top not in ignored and (ROOT / source).exists(), f"{path.name}: COPY {source}"


# ---------------------------------------------------------------------------------------------------- monitoring


def test_prometheus_scrapes_every_gateway(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {t for group in jobs["prefixgate"]["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:8765" for name in _gateways(services)}
    assert jobs["prefixgate"].get("metrics_path", "/metrics") == "/metrics"
    prometheus = services["prometheus"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]


def test_grafana_provisioning(services: dict[str, dict[str, Any]]) -> None:
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "prefixgate.yml").read_text())["providers"]
    mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"])
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {ds["uid"] for ds in _dicts_named(dashboard, "datasource")}
    assert uids == {datasource["uid"]}


def _dicts_named(node: Any, key: str) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key and isinstance(value, dict):
                yield value
            yield from _dicts_named(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from _dicts_named(item, key)


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(_strings_under(dashboard, {"expr", "query", "definition"}))
    used = {name for query in queries for name in _METRIC.findall(query)}
    assert used, "the dashboard queries no prefixgate metric"
    missing = used - _exported_metric_names()
    assert not missing, f"the dashboard queries metrics the gateway does not export: {sorted(missing)}"
    # The panels the deployment promises.
    for name in (
        "prefixgate_predicted_cached_blocks_total",
        "prefixgate_engine_cached_tokens_total",
        "prefixgate_engine_prompt_tokens_total",
        "prefixgate_time_to_first_byte_seconds_bucket",
        "prefixgate_requests_total",
        "prefixgate_upstream_errors_total",
        "prefixgate_in_flight_requests",
    ):
        assert name in used, name
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
