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
