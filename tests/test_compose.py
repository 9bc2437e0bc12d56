"""docker-compose.yml, checked without Docker: the Compose Specification schema, the settings it sets,
where its secrets come from, and the Prometheus files it mounts."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from workers.settings import Settings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
SCHEMA = REPO / "tests" / "data" / "compose-spec.json"  # see tests/data/compose-spec.NOTICE.md
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|BASIC_AUTH|REDISCLI_AUTH)$")
REFERENCE = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:\?|\?|:-|-)?(?P<arg>.*)\}$", re.DOTALL)
DUMMY_ENV = {"REDIS_PASSWORD": "example-password", "FLOWER_BASIC_AUTH": "admin:example",
             "EHRW_PAYLOAD_KEY": "example-fernet-key"}


class MissingVariable(ValueError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}`` (defaults may nest references)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                if j >= len(text):
                    raise ValueError(f"unterminated ${{ in {text!r}")
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                else:
                    depth, j = depth - (text[j] == "}"), j + 1
            match = REFERENCE.match(text[i:j])
            assert match, f"cannot parse {text[i:j]!r}"
            name, op, arg = match["name"], match["op"], match["arg"]
            value = env.get(name)
            if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
                raise MissingVariable(f"{name}: {arg}")
            if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
                value = interpolate(arg, env)
            out.append(value or "")
            i = j
        elif text[i] == "$" and i + 1 < len(text) and (text[i + 1].isalpha() or text[i + 1] == "_"):
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i + 1 :])
            out.append(env.get(m.group(0), ""))
            i += 1 + len(m.group(0))
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _walk(node, env):
    if isinstance(node, dict):
        return {k: _walk(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft201909Validator)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_interpolation_helper_follows_compose():
    env = {"A": "1", "EMPTY": ""}
    assert interpolate("$$A ${A} ${B:-x} ${EMPTY:-d} ${EMPTY-d} ${B:-${A}}", env) == "$A 1 x d  1"
    with pytest.raises(MissingVariable, match="B: say"):
        interpolate("${B:?say}", env)


def test_compose_file_follows_the_compose_specification(compose, validator):
    assert _errors(validator, compose) == []
    resolved = _walk(compose, DUMMY_ENV)
    assert _errors(validator, resolved) == []
    # the schema catches what it should: an unknown service key
    broken = json.loads(json.dumps(resolved))
    broken["services"]["worker"]["replicas_typo"] = 2
    assert _errors(validator, broken)


def test_the_stack_has_every_component(compose):
    services = compose["services"]
    assert {"kafka", "redis", "fhir", "models", "worker", "consumer", "flower", "prometheus"} <= set(services)
    assert (
        services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    )  # KRaft, no ZooKeeper
    redis_cmd = services["redis"]["command"]
    assert "--appendonly" in redis_cmd and "--requirepass" in redis_cmd and "--tls-port" in redis_cmd
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]  # scalable
    assert services["worker"]["command"][:4] == ["celery", "-A", "workers", "worker"]


def _environments(compose) -> dict[str, dict[str, str]]:
    out = {}
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        out[name] = {str(k): str(v) for k, v in env.items()}
    return out


def test_every_ehrw_variable_is_a_setting(compose):
    fields = {f"EHRW_{name.upper()}" for name in Settings.model_fields}
    used = {var for env in _environments(compose).values() for var in env if var.startswith("EHRW_")}
    assert used and sorted(used - fields) == []
    # and the values compose gives them are valid settings
    resolved = _environments(_walk(compose, DUMMY_ENV))
    for service in ("worker", "consumer"):
        env = {k: v for k, v in resolved[service].items() if k.startswith("EHRW_") and v != ""}
        old = dict(os.environ)
        try:
            os.environ.update(env)
            Settings()
        finally:
            os.environ.clear()
            os.environ.update(old)


def test_every_secret_comes_from_the_environment(compose):
    raw = COMPOSE.read_text()
    for service, env in _environments(compose).items():
        for var, value in env.items():
            if SECRET_NAME.search(var):
                match = REFERENCE.match(value)
                assert match, f"{service}: {var} must be ${{VAR:?...}} or ${{VAR:-}}, not a literal"
                assert match["op"] in (":?", "?") or match["arg"] == "", (
                    f"{service}: {var} has a default value"
                )
    values = json.dumps(compose)  # every string of the file, comments left out
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", values))
    assert required == set(DUMMY_ENV)
    for name in required:  # compose refuses to start without each one, naming it
        with pytest.raises(MissingVariable, match=name):
            _walk(compose, {k: v for k, v in DUMMY_ENV.items() if k != name})
    # the Redis password reaches every process through the URL, never written out
    redis_url = _environments(compose)["worker"]["EHRW_REDIS_URL"]
    assert "${REDIS_PASSWORD:?" in redis_url
    assert "requirepass" in raw and "example-password" not in raw


def test_prometheus_scrapes_both_processes_and_alerts_name_real_metrics(compose):
    from workers import metrics

    files = {name: REPO / cfg["file"] for name, cfg in compose["configs"].items()}
    prometheus = yaml.safe_load(files["prometheus"].read_text())
    envs = _environments(compose)
    targets = {
        sd["names"][0]: sd["port"]
        for job in prometheus["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
    }
    assert targets == {
        "worker": int(envs["worker"]["EHRW_WORKER_HTTP_PORT"]),
        "consumer": int(envs["consumer"]["EHRW_CONSUMER_HTTP_PORT"]),
    }
    rules = yaml.safe_load(files["alerts"].read_text())
    defined = {getattr(metrics, n)._name for n in dir(metrics) if hasattr(getattr(metrics, n), "_name")}
    defined.add("ehrw_celery_queue_depth")
    suffix = re.compile(r"_(total|bucket|count|sum)$")
    for rule in rules["groups"][0]["rules"]:
        for name in re.findall(r"\behrw_[a-z_]+", rule["expr"]):
            assert suffix.sub("", name) in defined, (rule["alert"], name)
