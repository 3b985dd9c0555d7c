"""A model server's deployment as Kubernetes manifests, on paper: generated here, never applied or tested here.

:func:`render_manifests` maps a deployment with ``replicas`` (:class:`~.scaling.ReplicaSettings`: kiln's balancer
in front of ``min..max`` server processes) to plain dicts for ``kubectl apply``: per served version (champion;
canary as its own Deployment with its share of the pods, since the Service spreads requests evenly over ready pods)
a ConfigMap holding the deployment file the pods read (that version alone, no ``replicas``: a pod is one server
process), a Deployment and an ``autoscaling/v2`` HorizontalPodAutoscaler (in-flight requests per pod, a Pods metric
from the servers' ``/metrics`` through the Prometheus Adapter, or CPU); a Service over every pod of the pipeline;
optionally a KServe ``InferenceService`` instead. A pod fetches its bundle from ``s3://`` into an ``emptyDir`` (or
mounts a claim holding bundle folders), is ready on ``GET /ready``, alive on ``GET /health``, and drains when it
stops (``preStop`` sleep while the endpoints update, then SIGTERM lets in-flight requests finish).

The token comes from a Secret (``secretKeyRef``), never from a manifest; the Secret itself is not generated:
``kubectl create secret generic <name>-token --from-literal=token=...``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Any

import yaml

from kiln.tasks.fleet.kubernetes_config import (
    BUNDLES_DIR,
    DEPLOYMENT_DIR,
    IN_FLIGHT_METRIC,
    KubernetesConfig,
    bundle_source,
    served_refs,
)
from kiln.tasks.serving.__main__ import GRACEFUL_SHUTDOWN_S
from kiln.tasks.serving.deployment import Deployment, ModelRef

log = logging.getLogger(__name__)


def split_replicas(total: int, share: float | None) -> tuple[int, int]:
    """Pods of the champion and of the canary out of ``total``, the canary's approximating ``share``.

    Each version gets at least one pod, so ``total`` must be at least 2 with a canary; the effective share of the
    canary is ``canary / (champion + canary)``.
    """
    if share is None:
        return total, 0
    canary = min(total - 1, max(1, round(total * share)))
    return total - canary, canary


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def _labels(config: KubernetesConfig, role: str | None = None, version: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "kiln-serve", "app.kubernetes.io/instance": config.base_name,
              "app.kubernetes.io/part-of": "kiln", "kiln.dev/pipeline": config.pipeline}
    if role is not None:
        labels["kiln.dev/role"] = role
    if version is not None:
        labels["kiln.dev/version"] = version
    return labels


def _meta(config: KubernetesConfig, name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if config.namespace:
        meta["namespace"] = config.namespace
    return meta


def _deployment_file(config: KubernetesConfig, role: str, ref: ModelRef) -> str:
    """The deployment file of a version's pods: that version alone, as their champion."""
    served = Deployment(model=config.pipeline, champion=ModelRef(ref.version, bundle_source(config, role, ref)),
                        updated_at=config.deployment.updated_at, capture=config.deployment.capture)
    return json.dumps(served.to_dict(), indent=2) + "\n"


def _env(config: KubernetesConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KILN_SERVE_HOST", "value": "0.0.0.0"},  # every interface of the pod: the Service reaches it
        {"name": "KILN_SERVE_PORT", "value": str(config.port)},
        {"name": "KILN_SERVE_RUNTIME", "value": config.runtime},
        {"name": "KILN_SERVE_TOKEN",
         "valueFrom": {"secretKeyRef": {"name": config.secret_name, "key": "token"}}}]
    if config.artifact_root:
        env.append({"name": "KILN_ARTIFACT_ROOT", "value": config.artifact_root})
    return env + _s3_env(config)


def _s3_env(config: KubernetesConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if config.s3_endpoint_url:
        env.append({"name": "KILN_S3_ENDPOINT_URL", "value": config.s3_endpoint_url})
    if config.s3_secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": config.s3_secret, "key": key}}}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    return env


def _resources(config: KubernetesConfig) -> dict[str, Any]:
    # No CPU limit: CFS throttling shows up as tail latency; memory (and GPUs) are limited at the request.
    requests = {"cpu": str(config.scaling.cpus), "memory": f"{config.memory_mib}Mi"}
    limits: dict[str, str] = {"memory": f"{config.memory_mib}Mi"}
    if config.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(config.gpus)
    return {"requests": requests, "limits": limits}


def _server_container(config: KubernetesConfig, bundle_mounts: list[dict[str, Any]]) -> dict[str, Any]:
    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 2,
                "failureThreshold": failures}

    return {
        "name": "server", "image": config.image,
        "args": ["--deployment", f"{DEPLOYMENT_DIR}/deployment.json", "--threads", str(config.scaling.cpus)],
        "ports": [{"name": "http", "containerPort": config.port, "protocol": "TCP"}],
        "env": _env(config), "resources": _resources(config),
        # Bundles load and warm up before the port opens: the startup probe allows 5 minutes for it.
        "startupProbe": probe("/health", 5, 60), "readinessProbe": probe("/ready", 5, 2),
        "livenessProbe": probe("/health", 10, 3),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(config.endpoints_delay_s)]}}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "deployment", "mountPath": DEPLOYMENT_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}, *bundle_mounts],
    }


def _bundle_volumes(config: KubernetesConfig, role: str, ref: ModelRef
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The init containers, volumes and server mounts that put the version's bundle in the pod."""
    if not ref.bundle.startswith("s3://"):
        return ([], [{"name": "bundles", "persistentVolumeClaim": {"claimName": config.bundles_claim,
                                                                   "readOnly": True}}],
                [{"name": "bundles", "mountPath": config.bundles_mount, "readOnly": True}])
    target = bundle_source(config, role, ref)
    sync = ["aws", "s3", "sync", "--only-show-errors", ref.bundle.rstrip("/") + "/", target + "/"]
    if config.s3_endpoint_url:
        sync[3:3] = ["--endpoint-url", config.s3_endpoint_url]
    fetch = {"name": "fetch-bundle", "image": config.fetch_image, "command": sync, "env": _s3_env(config),
             "volumeMounts": [{"name": "bundles", "mountPath": BUNDLES_DIR}],
             "securityContext": {"allowPrivilegeEscalation": False}}
    return ([fetch], [{"name": "bundles", "emptyDir": {}}],
            [{"name": "bundles", "mountPath": BUNDLES_DIR, "readOnly": True}])


def _pod_spec(config: KubernetesConfig, role: str, ref: ModelRef) -> dict[str, Any]:
    init, volumes, mounts = _bundle_volumes(config, role, ref)
    spec: dict[str, Any] = {
        # The preStop sleep, then the drain: SIGTERM lets in-flight requests finish (the server gives them at most
        # GRACEFUL_SHUTDOWN_S), SIGKILL ends the pod at the end of the period.
        "terminationGracePeriodSeconds": config.endpoints_delay_s + math.ceil(
            min(config.scaling.drain_timeout_s, GRACEFUL_SHUTDOWN_S)) + 1,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 0, "fsGroup": 0},
        "containers": [_server_container(config, mounts)],
        "volumes": [{"name": "deployment", "configMap": {"name": f"{config.base_name}-{role}"}},
                    {"name": "tmp", "emptyDir": {}}, *volumes]}
    if init:
        spec["initContainers"] = init
    return spec


def _version_objects(config: KubernetesConfig, role: str, ref: ModelRef, replicas: tuple[int, int]
                     ) -> list[dict[str, Any]]:
    """The ConfigMap, Deployment and autoscaler of one served version, starting at ``replicas[0]`` pods and
    scaling between ``replicas``."""
    name, labels = f"{config.base_name}-{role}", _labels(config, role, ref.version)
    file = _deployment_file(config, role, ref)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(config, name, dict(labels)),
                  "data": {"deployment.json": file}}
    selector = {k: v for k, v in labels.items() if k != "kiln.dev/version"}  # a selector cannot change later
    annotations = {"kiln.dev/deployment-sha256": hashlib.sha256(file.encode()).hexdigest(),  # a new file rolls
                   "prometheus.io/scrape": "true", "prometheus.io/port": str(config.port),
                   "prometheus.io/path": "/metrics"}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(config, name, dict(labels)),
        "spec": {"replicas": replicas[0], "selector": {"matchLabels": selector},
                 "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                 "template": {"metadata": {"labels": dict(labels), "annotations": annotations},
                              "spec": _pod_spec(config, role, ref)}}}
    return [config_map, deployment, _autoscaler(config, name, dict(labels), replicas)]


def _autoscaler(config: KubernetesConfig, name: str, labels: dict[str, str], replicas: tuple[int, int]
                ) -> dict[str, Any]:
    scaling = config.scaling
    if config.autoscale_on == "in_flight":
        metric: dict[str, Any] = {"type": "Pods", "pods": {
            "metric": {"name": IN_FLIGHT_METRIC},
            "target": {"type": "AverageValue", "averageValue": _quantity(scaling.target_in_flight)}}}
    else:
        metric = {"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": config.target_cpu_percent}}}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(config, name, labels),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                     "minReplicas": replicas[0], "maxReplicas": replicas[1], "metrics": [metric],
                     "behavior": {"scaleUp": {"stabilizationWindowSeconds": math.ceil(scaling.scale_up_s)},
                                  "scaleDown": {"stabilizationWindowSeconds": math.ceil(scaling.scale_down_s),
                                                "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}}}}


def _service(config: KubernetesConfig) -> dict[str, Any]:
    selector = {k: v for k, v in _labels(config).items() if k != "app.kubernetes.io/part-of"}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(config, config.base_name, _labels(config)),
            "spec": {"type": "ClusterIP", "selector": selector,
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def _inference_service(config: KubernetesConfig) -> dict[str, Any]:
    """KServe's form: the predictor serves the newest version (the canary, when there is one); KServe keeps the
    previous ready revision (the champion, applied before) for the remaining ``100 - canaryTrafficPercent``."""
    dep = config.deployment
    role, ref = ("canary", dep.canary.ref) if dep.canary is not None else ("champion", dep.champion)
    pod = _pod_spec(config, role, ref)
    container = {**pod["containers"][0], "name": "kserve-container"}
    predictor: dict[str, Any] = {
        "minReplicas": config.scaling.min, "maxReplicas": config.scaling.max,
        "scaleMetric": "concurrency" if config.autoscale_on == "in_flight" else "cpu",
        "scaleTarget": math.ceil(config.scaling.target_in_flight) if config.autoscale_on == "in_flight"
        else config.target_cpu_percent,
        **{k: v for k, v in pod.items() if k != "containers"}, "containers": [container]}
    if dep.canary is not None:
        predictor["canaryTrafficPercent"] = round(dep.canary.share * 100)
    meta = _meta(config, config.base_name, _labels(config, role, ref.version))
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": meta,
            "spec": {"predictor": predictor}}


def render_manifests(config: KubernetesConfig) -> list[dict[str, Any]]:
    """The manifests of ``config``'s model server: per version a ConfigMap, a Deployment and an autoscaler, then
    the Service (and a KServe InferenceService when ``config.kserve``).

    The canary's pods are ``split_replicas(n, share)[1]`` of ``n`` at both ends of the autoscaling range, so the
    canary receives about ``share`` of the requests (exactly: its pods over all ready pods).
    """
    share = config.deployment.canary.share if config.deployment.canary is not None else None
    least = config.scaling.min
    low, high = split_replicas(least, share), split_replicas(config.scaling.max, share)
    if share is not None and abs(low[1] / least - share) > 0.05:
        log.warning("the canary of %s gets %d of %d pods at replicas.min, so about %.0f %% of the requests instead "
                    "of %.0f %%: raise replicas.min, or use KServe's canaryTrafficPercent (kserve=True)",
                    config.pipeline, low[1], least, 100 * low[1] / least, 100 * share)
    docs: list[dict[str, Any]] = []
    for index, (role, ref) in enumerate(served_refs(config.deployment)):
        docs += _version_objects(config, role, ref, (low[index], max(low[index], high[index])))
    docs.append(_service(config))
    if config.kserve:
        docs.append(_inference_service(config))
    return docs


def render_manifests_yaml(config: KubernetesConfig) -> str:
    """:func:`render_manifests` as one multi-document YAML text, for ``kubectl apply -f -``."""
    return yaml.safe_dump_all(render_manifests(config), sort_keys=False, default_flow_style=False)
