"""What one pipeline's model server looks like on Kubernetes (:class:`KubernetesConfig`), validated on
construction; :mod:`.kubernetes` renders it as manifests."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal, get_args

from kiln.tasks.serving.deployment import Deployment, ModelRef
from kiln.tasks.serving.scaling import ReplicaSettings
from kiln.tasks.settings import SERVE_RUNTIMES, ServeRuntime

log = logging.getLogger(__name__)

AutoscaleSignal = Literal["in_flight", "cpu"]
#: The Pods metric of the in-flight signal, as the Prometheus Adapter exposes the servers' gauge.
IN_FLIGHT_METRIC = "kiln_serve_in_flight"
#: Where the deployment file and the fetched bundles are in a pod.
DEPLOYMENT_DIR, BUNDLES_DIR = "/etc/kiln", "/bundles"
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
#: The longest role suffix of a Deployment's name ("-champion"): the name plus it must stay a 63-character label.
_MAX_NAME = 63 - len("-champion")


class ManifestError(ValueError):
    """An input the manifests cannot be generated from; the message names the field and the fix."""


@dataclass(frozen=True)
class KubernetesConfig:
    """How one pipeline's model server runs on Kubernetes."""

    pipeline: str
    """The pipeline (the deployment's ``model``): scoped tokens are checked against it."""
    image: str
    """The serve image (``docker/serve.Dockerfile``), e.g. ``registry.example.com/ml/kiln-serve:1.4``."""
    deployment: Deployment
    """What is served: champion (and canary). Bundles are ``s3://`` URIs, or paths under ``bundles_mount``."""
    replicas: ReplicaSettings | None = None
    """Pods (all versions together), the in-flight target, the stabilisation windows, the drain time and the cores
    per pod; ``None``: the deployment's ``replicas`` (one pod without them)."""
    autoscale_on: AutoscaleSignal = "in_flight"
    """The autoscaling signal: ``in_flight`` (``replicas.target_in_flight`` requests in flight per pod) or ``cpu``
    (``target_cpu_percent`` CPU utilisation)."""
    target_cpu_percent: int = 70
    """With ``cpu``: the average CPU utilisation (percent of the CPU request) the autoscaler keeps."""
    port: int = 8765
    """The port the server listens on in the pod (``KILN_SERVE_PORT``); the Service exposes it as port 80."""
    memory_mib: int = 1024
    """Memory per pod in MiB, requested and limited."""
    gpus: int = 0
    """GPUs per pod (``nvidia.com/gpu``), for a GPU build of the serve image."""
    runtime: ServeRuntime = "auto"
    """What runs the models (``KILN_SERVE_RUNTIME``): auto, onnx or torch."""
    name: str = ""
    """Base name of the objects (DNS-1035 label); empty: ``kiln-<pipeline>`` with ``_`` as ``-``."""
    namespace: str = ""
    """The namespace of every object; empty: the one kubectl applies to."""
    token_secret: str = ""
    """The Secret (key ``token``) holding the server's bearer token; empty: ``<name>-token``."""
    s3_secret: str = ""
    """A Secret with ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (read bundles, write captures); empty: the
    pod's own identity (e.g. IRSA)."""
    s3_endpoint_url: str = ""
    """An S3-compatible endpoint (MinIO...); empty: AWS's."""
    artifact_root: str = ""
    """``KILN_ARTIFACT_ROOT`` of the pods (captures go there); empty: the pod's local default (captures are lost
    with the pod)."""
    fetch_image: str = "amazon/aws-cli:2.17.0"
    """The init container's image that copies an ``s3://`` bundle into the pod (``aws s3 sync``)."""
    bundles_claim: str = ""
    """A PersistentVolumeClaim holding bundle folders (for bundles given as paths), mounted read-only."""
    bundles_mount: str = "/srv/kiln/bundles"
    """Where ``bundles_claim`` is mounted; bundle paths must lie under it."""
    endpoints_delay_s: int = 5
    """Seconds a stopping pod keeps serving (``preStop``) while the Service stops routing to it; then it has
    ``replicas.drain_timeout_s`` to finish its in-flight requests."""
    kserve: bool = False
    """Also emit a KServe ``InferenceService`` (an alternative to the Deployments, Service and autoscalers)."""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def base_name(self) -> str:
        """The objects' base name."""
        return self.name or "kiln-" + self.pipeline.lower().replace("_", "-")

    @property
    def scaling(self) -> ReplicaSettings:
        """The replica settings in force."""
        return self.replicas or self.deployment.replicas or ReplicaSettings()

    @property
    def secret_name(self) -> str:
        """The Secret holding the token."""
        return self.token_secret or f"{self.base_name}-token"


def _fail(field: str, message: str) -> ManifestError:
    return ManifestError(f"{field} {message}")


def _check_int(config: KubernetesConfig, field: str, low: int, high: int | None = None) -> None:
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _fail(field, f"must be an integer {bound}, found {value!r}")


def _check_names(config: KubernetesConfig) -> None:
    if not isinstance(config.pipeline, str) or not _LABEL_VALUE.fullmatch(config.pipeline) \
            or len(config.pipeline) > 63:
        raise _fail("pipeline", f"must be a pipeline name of at most 63 letters, digits and '_' (it becomes a label "
                                f"value), found {config.pipeline!r}")
    name = config.base_name
    if not _DNS_LABEL.fullmatch(name) or len(name) > _MAX_NAME:
        raise _fail("name", f"{name!r} is not a DNS-1035 label of at most {_MAX_NAME} characters (lower-case letters, "
                            "digits and '-', starting with a letter); pass a shorter name")
    for field in ("namespace", "token_secret", "s3_secret", "bundles_claim"):
        value = getattr(config, field)
        if value and (not _DNS_SUBDOMAIN.fullmatch(value) or len(value) > (63 if field == "namespace" else 253)):
            raise _fail(field, f"must be a DNS-1123 name (lower-case letters, digits, '-' and '.'), found {value!r}")


def _validate(config: KubernetesConfig) -> None:
    _check_names(config)
    for field in ("image", "fetch_image"):
        value = getattr(config, field)
        if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
            raise _fail(field, f"must be an image reference such as registry.example.com/ml/kiln-serve:1.4, "
                               f"found {value!r}")
    if not isinstance(config.deployment, Deployment):
        raise _fail("deployment", f"must be a kiln Deployment, found {type(config.deployment).__name__}")
    if config.deployment.model != config.pipeline:
        raise _fail("deployment", f"serves {config.deployment.model!r}, not the pipeline {config.pipeline!r}; "
                                  "pass that pipeline's deployment")
    if config.replicas is not None and not isinstance(config.replicas, ReplicaSettings):
        raise _fail("replicas", f"must be a ReplicaSettings or None, found {type(config.replicas).__name__}")
    if config.deployment.canary is not None and config.scaling.min < 2:
        raise _fail("replicas.min", f"must be at least 2 with a canary (one pod per version), found "
                                    f"{config.scaling.min}")
    if config.autoscale_on not in get_args(AutoscaleSignal):
        raise _fail("autoscale_on", f"must be one of {', '.join(get_args(AutoscaleSignal))}, "
                                    f"found {config.autoscale_on!r}")
    if config.runtime not in SERVE_RUNTIMES:
        raise _fail("runtime", f"must be one of {', '.join(SERVE_RUNTIMES)}, found {config.runtime!r}")
    _check_int(config, "target_cpu_percent", 1, 1000)
    _check_int(config, "port", 1, 65535)
    _check_int(config, "memory_mib", 64)
    _check_int(config, "gpus", 0)
    _check_int(config, "endpoints_delay_s", 0, 300)
    for role, ref in served_refs(config.deployment):
        if not _LABEL_VALUE.fullmatch(ref.version) or len(ref.version) > 63:
            raise _fail(f"deployment.{role}.version", f"must be a label value (letters, digits, '-', '_', '.'), "
                                                      f"found {ref.version!r}")
        bundle_source(config, role, ref)


def served_refs(deployment: Deployment) -> list[tuple[str, ModelRef]]:
    refs = [("champion", deployment.champion)]
    return refs + ([("canary", deployment.canary.ref)] if deployment.canary is not None else [])


def bundle_source(config: KubernetesConfig, role: str, ref: ModelRef) -> str:
    """Where the pod finds the bundle: the fetched copy of an ``s3://`` URI, or the path on the claim."""
    if ref.bundle.startswith("s3://") and len(ref.bundle) > len("s3://"):
        return f"{BUNDLES_DIR}/v{ref.version}"
    mount = config.bundles_mount.rstrip("/")
    if config.bundles_claim and ref.bundle.startswith(mount + "/") and ".." not in ref.bundle.split("/"):
        return ref.bundle
    raise _fail(f"deployment.{role}.bundle", f"must be an s3:// URI (fetched into the pod), or a path under "
                                             f"bundles_mount {mount!r} with bundles_claim set, found {ref.bundle!r}")
