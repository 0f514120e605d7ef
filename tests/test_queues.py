"""Queue names are defined once (shared/queues.py): the deploy files name only those, and every queue
has a consumer in each deployment (docker-compose, Kubernetes) and in the embedded stack."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from shared import queues

ROOT = Path(__file__).resolve().parents[1]


def _q_lists(args: list[str]) -> list[set[str]]:
    return [set(args[i + 1].split(",")) for i, a in enumerate(args[:-1]) if a in ("-Q", "--queues")]


def _compose_consumers() -> list[set[str]]:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    out = []
    for svc in services.values():
        command = svc.get("command")
        if isinstance(command, list):
            out += _q_lists([str(c) for c in command])
    return out


def _k8s_consumers() -> list[set[str]]:
    out = []
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for container in _containers(doc):
                out += _q_lists([str(a) for a in container.get("args") or []])
    return out


def _containers(doc) -> list[dict]:
    if not isinstance(doc, dict):
        return []
    spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    return list(spec.get("containers") or [])


def test_every_deployment_consumes_every_queue_and_names_no_other():
    for name, consumers in (("docker-compose.yml", _compose_consumers()), ("deploy/k8s", _k8s_consumers())):
        assert consumers, f"{name}: no worker found"
        named = set().union(*consumers)
        assert named <= set(queues.ALL), f"{name} names unknown queues {named - set(queues.ALL)}"
        assert named == set(queues.ALL), f"{name} leaves {set(queues.ALL) - named} without a consumer"
        # GPU workers take the three stages together: a photo's chain never waits on a missing stage.
        assert any(set(queues.PIPELINE) <= c for c in consumers)


def test_other_deploy_files_name_only_known_queues():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for match in re.findall(r'"-Q",\s*"([^"]+)"', dockerfile):
        assert set(match.split(",")) <= set(queues.ALL)
    keda = (ROOT / "deploy" / "k8s" / "keda.yaml").read_text()
    for name in re.findall(r"listName:\s*(\S+)", keda):
        assert name in queues.ALL


def test_the_workers_routes_and_the_embedded_stack_use_the_definitions():
    from worker.celery_app import app

    routes = app.conf.task_routes
    assert {r["queue"] for r in routes.values()} == set(queues.ALL)
    assert app.conf.task_default_queue == queues.DEFAULT
    stack = (ROOT / "shared" / "stack.py").read_text()
    assert '"detect,align,infer"' not in stack and '"default,train"' not in stack
