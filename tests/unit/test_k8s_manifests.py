"""The Kubernetes manifests under deploy/k8s, checked offline.

Core kinds are validated against the Kubernetes OpenAPI schemas in strict mode
(unknown fields are errors) by `kubernetes-validate`; KEDA's custom resources
against KEDA's generated models (a field the model does not know would be
lost in the round trip, so the round trip must give the document back). The
rest are the promises the manifests make: no listening port, probes that run
`sagaworks health`, a grace period longer than the worker's own, a scaler that
never goes to zero and watches exactly the queues the worker consumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda

from sagaworks.adapters.rabbitmq.topology import dead_letter_queue_name
from sagaworks.application.registry import SagaRegistry
from sagaworks.bootstrap import topology_for
from sagaworks.entrypoints.cli.loading import load_sagas
from sagaworks.settings import Settings

pytestmark = pytest.mark.unit

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"
KEDA_KINDS = {
    "ScaledObject": keda.ScaledObject,
    "TriggerAuthentication": keda.TriggerAuthentication,
}


def _documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    documents = []
    for name in kustomization["resources"]:
        documents.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return documents


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _worker() -> dict[str, Any]:
    return _one("Deployment", "sagaworks-worker")


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_kustomization_lists_every_manifest_in_the_folder() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize(
    "document",
    [d for d in _documents() if d["kind"] not in KEDA_KINDS],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_core_resources_are_valid_kubernetes(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "document",
    [d for d in _documents() if d["kind"] in KEDA_KINDS],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_keda_resources_are_valid_and_lose_nothing(document: dict[str, Any]) -> None:
    model = KEDA_KINDS[document["kind"]].model_validate(document)
    assert model.model_dump(by_alias=True, exclude_none=True, mode="json") == document


def test_the_worker_listens_on_nothing() -> None:
    kinds = {d["kind"] for d in _documents()}
    assert not kinds & {"Service", "Ingress", "Route"}
    for container in _worker()["spec"]["template"]["spec"]["containers"]:
        assert "ports" not in container
    policy = _one("NetworkPolicy")
    assert "Ingress" in policy["spec"]["policyTypes"]
    assert policy["spec"]["ingress"] == []


def test_probes_run_the_health_command() -> None:
    (container,) = _worker()["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["sagaworks", "health"], probe


def test_kubernetes_waits_longer_than_the_worker_drains() -> None:
    pod = _worker()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    grace = Settings(grace_period_s=_env(container)["SAGAWORKS_GRACE_PERIOD_S"]).grace_period_s
    assert pod["terminationGracePeriodSeconds"] >= grace + 5


def test_every_variable_and_secret_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    (container,) = _worker()["spec"]["template"]["spec"]["containers"]
    for name in _env(container):
        if name.startswith("SAGAWORKS_"):
            assert name.removeprefix("SAGAWORKS_").lower() in fields, name
    for secret in (d for d in _documents() if d["kind"] == "Secret"):
        if secret["metadata"]["name"] != "sagaworks-keda":
            assert set(secret["stringData"]) <= fields, secret["metadata"]["name"]


def test_the_scaler_never_stops_the_last_worker_and_scales_down_gently() -> None:
    spec = _one("ScaledObject")["spec"]
    assert spec["scaleTargetRef"]["name"] == "sagaworks-worker"
    assert spec["minReplicaCount"] >= 1
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])
    assert _one("PodDisruptionBudget")["spec"]["minAvailable"] >= 1


def test_the_scaler_watches_every_queue_the_worker_consumes() -> None:
    (container,) = _worker()["spec"]["template"]["spec"]["containers"]
    settings = Settings(sagas=json.loads(_env(container)["SAGAWORKS_SAGAS"]))
    registry = SagaRegistry(load_sagas(settings, with_ports=False).definitions)
    spec = topology_for(settings, registry)
    consumed = {q.name for q in spec.queues} - {dead_letter_queue_name(settings.exchange_prefix)}
    watched = {t["metadata"]["queueName"] for t in _one("ScaledObject")["spec"]["triggers"]}
    assert watched == consumed
