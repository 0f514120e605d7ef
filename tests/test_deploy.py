"""Deployment files, proven without Docker: schemas, commands, settings, and worker failover."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shared.cli import main as gestalt_cli
from shared.stack import Process
from tests.conftest import PASSWORD, TEST_SETTINGS, Portal, wait_http

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_schema():
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                        str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_services():
    services = _compose()["services"]
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "web", "worker-gpu", "worker-cpu",
            "worker-default", "beat", "flower"} <= set(services)
    gpu = services["worker-gpu"]
    assert gpu["command"][:3] == ["worker", "-Q", "detect,align,infer"] and gpu["command"][4] == "1"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    for name in ("web", "worker-gpu", "worker-cpu", "worker-default", "beat", "flower"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    for name in ("worker-gpu", "worker-cpu", "worker-default"):
        assert "inspect ping" in " ".join(services[name]["healthcheck"]["test"]), name
    assert services["beat"]["deploy"]["replicas"] == 1
    assert set(_compose()["volumes"]) >= {"pgdata", "redisdata", "miniodata"}


def _gestalt_commands() -> list[list[str]]:
    """Every command line given to the gestalt image: compose services, Dockerfile CMDs, k8s args."""
    commands = [s["command"] for s in _compose()["services"].values()
                if "build" in s and isinstance(s.get("command"), list)]
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("CMD "):
            commands.append(yaml.safe_load(line[4:]))
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {})
            template = spec.get("template", {}).get("spec", {})
            for container in template.get("containers", []):
                if "gestalt" in container.get("image", ""):
                    commands.append(container["args"])
    return commands


def test_every_service_command_is_a_gestalt_subcommand():
    commands = _gestalt_commands()
    assert len(commands) >= 10
    for argv in commands:
        assert argv[0] in gestalt_cli.commands, f"`gestalt {argv[0]}` does not exist"
        ctx = gestalt_cli.make_context("gestalt", list(argv), resilient_parsing=True)
        assert ctx.protected_args or ctx.invoked_subcommand or argv[0] in gestalt_cli.commands


def test_every_setting_the_code_reads_is_in_env_example():
    pattern = re.compile(r"""(?:_str|_int|_float|_bool|environ\.get|environ\[|getenv)\(?\s*["']([A-Z][A-Z0-9_]+)["']""")
    read = set()
    for folder in ("shared", "web", "worker"):
        for path in (ROOT / folder).rglob("*.py"):
            read |= set(pattern.findall(path.read_text()))
    assert {"GESTALT_DATABASE_URL", "GESTALT_SECRET_KEY", "GESTALT_RETRAIN_CRON"} <= read
    read.discard("PATH")  # where `gestalt up` finds the weed binary: the system's, not a setting
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert not read - listed, f"missing from .env.example: {sorted(read - listed)}"
    secrets = {"GESTALT_SECRET_KEY", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "REDIS_PASSWORD"}
    for line in (ROOT / ".env.example").read_text().splitlines():
        key, _, value = line.partition("=")
        if key in secrets:
            assert value == "", f"{key} must have no default"


def test_kubernetes_manifests_validate():
    core = [p for p in sorted(K8S.glob("*.yaml")) if p.name != "keda.yaml"]
    r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *map(str, core)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = [d["kind"] for p in core for d in yaml.safe_load_all(p.read_text()) if d]
    assert kinds.count("PodDisruptionBudget") == 2 and "Job" in kinds
    workers = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all((K8S / "workers.yaml").read_text())
               if d}
    gpu = workers["Deployment", "gestalt-worker-gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    beat = workers["Deployment", "gestalt-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    keda = yaml.safe_load((K8S / "keda.yaml").read_text())
    assert keda["apiVersion"] == "keda.sh/v1alpha1" and keda["kind"] == "ScaledObject"
    assert keda["spec"]["scaleTargetRef"]["name"] == "gestalt-worker-gpu"
    assert {t["metadata"]["listName"] for t in keda["spec"]["triggers"] if t["type"] == "redis"} == {"detect", "infer"}


@pytest.fixture
def cluster(tmp_path):
    """A separate broker, database and object store, so that only the two "machines" consume its queues."""
    from sqlalchemy import create_engine

    from shared import migrate
    from shared.db import normalise_url
    from shared.stack import EmbeddedEngines, Ports, free_port

    engines = EmbeddedEngines(tmp_path / "cluster", Ports.free())
    engines.start()
    env = {**os.environ, **engines.env, **TEST_SETTINGS}
    migrate.upgrade(engines.env["GESTALT_DATABASE_URL"])
    port = free_port()
    web = Process("web", [sys.executable, "-m", "shared.cli", "web", "--port", str(port), "--workers", "1"], env,
                  engines.logs / "web.log")
    web.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", web)
    db = create_engine(normalise_url(engines.env["GESTALT_DATABASE_URL"]))
    yield engines, env, url, db
    db.dispose()
    web.stop()
    engines.stop()


def _wait_until_ready(logs: Path, machines: dict, timeout: float = 120.0) -> None:
    """Both workers consume from the broker (each has logged that it is ready)."""
    deadline = time.monotonic() + timeout
    waiting = set(machines)
    while waiting and time.monotonic() < deadline:
        waiting = {name for name in waiting if f"worker@{name} ready." not in
                   (logs / f"{name}.log").read_text(errors="replace")}
        time.sleep(0.2)
    assert not waiting, f"{sorted(waiting)} did not start"


@pytest.mark.e2e
def test_two_machines_one_killed_mid_task(cluster):
    """Two workers named as two machines share the broker; SIGKILL one mid-task, the other finishes."""
    import io

    from PIL import Image
    from skimage import data
    from sqlalchemy import text

    engines, env, url, db = cluster
    email = "failover@clinic.example"
    made = subprocess.run([sys.executable, "-m", "shared.cli", "users", "create", "--email", email, "--password",
                           PASSWORD], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    # One photo per task, so that both machines take photos: with batches, the first machine ready could
    # claim all eight at once.
    worker_env = {**env, "GESTALT_DETECT_BATCH": "1"}
    machines = {name: Process(name, [sys.executable, "-m", "shared.cli", "worker", "-Q", "detect,align,infer,default",
                                     "-c", "1", "-n", f"worker@{name}"], worker_env, engines.logs / f"{name}.log")
                for name in ("machine-a", "machine-b")}
    beat = Process("beat", [sys.executable, "-m", "shared.cli", "beat"], env, engines.logs / "beat.log")
    for p in (*machines.values(), beat):
        p.start()
    try:
        _wait_until_ready(engines.logs, machines)
        portal = Portal(url, email)
        case_id = portal.create_case("PT-FAILOVER")
        for i in range(8):
            buf = io.BytesIO()
            Image.fromarray(data.astronaut()[:, i:]).save(buf, format="PNG")
            assert portal.upload(case_id, [(f"{i}.png", buf.getvalue())]).status_code == 201

        def stage_nodes():
            with db.connect() as conn:
                return {row.id: row.stage_times or {} for row in conn.execute(
                    text("select id, stage_times from images where case_id = :c"), {"c": case_id})}

        deadline = time.monotonic() + 180
        victim_started = set()
        while time.monotonic() < deadline and not victim_started:
            victim_started = {i for i, t in stage_nodes().items()
                              if any(v == "worker@machine-a" for k, v in t.items() if k.endswith("_by"))}
            time.sleep(0.05)
        assert victim_started, "machine-a never took a task"
        machines["machine-a"].kill()
        killed_at = time.time()
        payload = portal.wait(case_id, timeout=300, settled=("done", "awaiting_model", "rejected", "failed"))
        assert {i["status"] for i in payload["images"]} == {"awaiting_model"}  # no model here: all preprocessed
        times = stage_nodes()
        late = [v for t in times.values() for k, v in t.items()
                if k.endswith("_by") and (t.get(k.replace("_by", "_start")) or 0) > killed_at]
        assert "worker@machine-a" not in late
        assert "worker@machine-b" in {v for t in times.values() for k, v in t.items() if k.endswith("_by")}
        print(f"\nmachine-a took {len(victim_started)} photo(s) before it was killed; all 8 finished, "
              f"the last stages by {sorted(set(late)) or ['(already done)']}")
    finally:
        for p in (*machines.values(), beat):
            p.stop(timeout=30)


# ---------------------------------------------------------------- the images the deployment files name
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _stages() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M | re.I))


def _default(value: str) -> str:
    """A compose value with its ${VAR:-default} interpolations resolved to their defaults."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def _k8s_docs() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _k8s_containers() -> list[dict]:
    return [c for d in _k8s_docs() for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])]


def test_every_image_the_deployment_runs_is_a_stage_of_the_dockerfile():
    """Compose builds an existing target and tags it by that target; Kubernetes runs the same targets."""
    stages = _stages()
    assert {"cpu", "gpu"} <= stages
    services = _compose()["services"]
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
            assert build["target"] in stages, f"{name}: no stage {build['target']!r} in deploy/Dockerfile"
            assert _default(service["image"]).rsplit(":", 1)[1] == build["target"], name
        else:  # third-party images: pinned, never :latest
            tag = service["image"].rsplit(":", 1)[-1] if ":" in service["image"] else "latest"
            assert tag != "latest", name
    for container in _k8s_containers():
        repo, tag = container["image"].rsplit(":", 1)
        if repo.endswith("/gestalt"):
            assert tag in stages, f"{container['name']}: no stage {tag!r} in deploy/Dockerfile"


def test_the_dockerfile_copies_only_what_exists_and_is_not_ignored():
    """Every COPY and bind-mount source is in the repository and passes .dockerignore, and the image's user
    is the uid the Kubernetes pods run as."""
    import fnmatch

    text = DOCKERFILE.read_text().replace("\\\n", " ")
    sources = [s for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.M) for s in line.split()[:-1]]
    sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", text)
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()[:1] not in ("", "#")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source}, which does not exist"
        assert not any(fnmatch.fnmatch(source, p) or source.startswith(p.rstrip("/") + "/") for p in ignored), source
    assert {".env", "var"} <= set(ignored)
    assert set(re.findall(r"^USER\s+(\d+)", text, re.M)) == {"10001"}
    for doc in _k8s_docs():
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        if "securityContext" in pod:
            assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001}, doc["metadata"]["name"]


def _env_example() -> set[str]:
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))


def _required_settings() -> set[str]:
    """What every Gestalt service refuses to start without (Settings.require_secrets)."""
    import inspect

    from shared.config import Settings

    return set(re.findall(r'"(GESTALT_[A-Z0-9_]+)"', inspect.getsource(Settings.require_secrets)))


def test_every_variable_compose_reads_is_in_env_example():
    """The variables compose interpolates come from .env (a copy of .env.example); the settings it hands a
    service are real settings; a variable a service's own shell reads ($$VAR) is in that service's
    environment; and every Gestalt service is given what it needs to start."""
    text = (ROOT / "docker-compose.yml").read_text()
    listed = _env_example()
    interpolated = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", text))
    assert interpolated and not interpolated - listed, f"not in .env.example: {sorted(interpolated - listed)}"
    required = _required_settings()
    assert "GESTALT_SECRET_KEY" in required
    for name, service in _compose()["services"].items():
        env = service.get("environment", {})
        settings = {k for k in env if k.startswith("GESTALT_")}
        assert not settings - listed, f"{name}: not settings: {sorted(settings - listed)}"
        shell = " ".join(str(x) for x in (service.get("healthcheck", {}).get("test", []),
                                          service.get("command", "")))
        for var in set(re.findall(r"\$\$\{?([A-Za-z_][A-Za-z0-9_]*)", shell)) - {"HOSTNAME"}:
            assert var in env, f"{name} reads ${var}, which its environment does not set"
        if "build" in service:
            assert required <= set(env), f"{name} lacks {sorted(required - set(env))}"


def test_every_variable_the_pods_read_is_in_the_configmap_or_the_secret():
    """The pods get settings from the ConfigMap and the Secret gestalt-secrets (its keys are in
    deploy/k8s/secrets.env.example): each is a real setting, the required ones are there, and KEDA's
    Redis trigger reads variables the scaled pods have."""
    listed = _env_example()
    secret = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (K8S / "secrets.env.example").read_text(), re.M))
    config = next(d for d in _k8s_docs() if d["kind"] == "ConfigMap")
    assert config["metadata"]["name"] == "gestalt-config"
    assert not set(config["data"]) - listed, sorted(set(config["data"]) - listed)
    assert _required_settings() <= secret | set(config["data"])
    assert not secret & set(config["data"]), "a setting both in the ConfigMap and in the Secret"
    for container in _k8s_containers():
        sources = {kind: ref["name"] for source in container.get("envFrom", []) for kind, ref in source.items()}
        assert sources == {"configMapRef": "gestalt-config", "secretRef": "gestalt-secrets"}, container["name"]
        named = {e["name"] for e in container.get("env", [])}
        assert not {n for n in named if n.startswith("GESTALT_")} - listed, container["name"]
    keda = yaml.safe_load((K8S / "keda.yaml").read_text())
    read = {t["metadata"][k] for t in keda["spec"]["triggers"] for k in ("addressFromEnv", "passwordFromEnv")}
    assert read <= secret, f"KEDA reads {sorted(read - secret)}, which the Secret lacks"
    assert not (secret - _required_settings() - read) - listed, "a Secret key that is no setting"


def _host_pip():
    """deploy/host_pip.py (a script beside the Dockerfile, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("host_pip", ROOT / "deploy" / "host_pip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_pip_reads_pips_own_settings(tmp_path, monkeypatch):
    """`build-image.sh --host-pip` takes pip's settings as pip reports them: files by section, variables."""
    conf = tmp_path / "pip.conf"
    conf.write_text("[install]\ntimeout = 7\n[global]\nextra-index-url = https://a.example/simple b\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_FIND_LINKS", "/srv/wheels")
    sections = _host_pip().pip_config()
    assert sections["install"]["timeout"] == "7"
    assert sections["global"]["extra-index-url"] == "https://a.example/simple b"
    assert sections[":env:"]["find-links"] == "/srv/wheels"


def test_host_pip_folds_variables_over_files_and_serves_local_paths(tmp_path):
    """A PIP_* variable wins over every file (as for pip); the cert leaves the pip.conf (it becomes the
    build's CA secret); local folders, file:// indexes (with the files beside simple/) and constraint files
    become URLs on 127.0.0.1 below links to them, remote URLs stay."""
    host_pip = _host_pip()
    wheels, index, constraints = tmp_path / "wheels", tmp_path / "pypi" / "simple", tmp_path / "constraints.txt"
    wheels.mkdir()
    index.mkdir(parents=True)
    constraints.write_text("torch<=2.14.1\n")
    merged, cert = host_pip.merged({
        "global": {"cert": "/etc/file-ca.pem", "find-links": "/nowhere", "constraint": str(constraints),
                   "extra-index-url": f"file://{index} https://mirror.example/simple", "timeout": "60"},
        "install": {"find-links": "/elsewhere"},
        ":env:": {"find-links": str(wheels), "cert": "/etc/env-ca.pem"},
    })
    assert cert == "/etc/env-ca.pem"
    assert merged == {"global": {"constraint": str(constraints), "timeout": "60", "find-links": str(wheels),
                                 "extra-index-url": f"file://{index} https://mirror.example/simple"}}
    serve = tmp_path / "serve"
    serve.mkdir()
    out = host_pip.serve_locally(merged, serve, "http://127.0.0.1:9")["global"]
    assert out["find-links"] == "http://127.0.0.1:9/0/"
    assert out["extra-index-url"] == "http://127.0.0.1:9/1/simple/ https://mirror.example/simple"
    assert out["constraint"] == "http://127.0.0.1:9/2"
    assert [(serve / n).resolve() for n in "012"] == [wheels, index.parent, constraints]
