"""What each pipeline serves, kept in the artifact store, so that any host can serve it.

A model server reads a deployment file on its own host (``$KILN_SERVING_DIR/<model>/deployment.json``), with
bundle folders of that host. That file is written by the host that ran ``deploy``; with Celery workers on several
hosts (and an S3 artifact store) no other host would know what is served. So every change of an endpoint is also
published to the store, under ``<model>/_serving/deployment.json`` (:func:`publish_served`): the deployment with
its registry versions, or ``null`` once nothing is served.

``kiln up`` on any host (``python -m kiln.tasks.pipeline.served``, before its model servers start) writes the local
deployment file of every pipeline from that record (:func:`materialise`) when the local file is missing or older,
its bundles fetched from the model registry by version. The model servers then serve what the platform deployed.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kiln.tasks.pipeline.endpoint import DEPLOYMENT_FILE, Endpoint, bundle_cache
from kiln.tasks.storage.artifacts import read_json, write_json

if TYPE_CHECKING:
    from kiln.tasks.serving.deployment import Deployment
    from kiln.tasks.storage.artifacts import ArtifactStore
    from kiln.tasks.tracking.registry import Registry

log = logging.getLogger(__name__)

#: The store folder of a model's served record, under the model's prefix.
SERVED_FOLDER = "_serving"


def served_key(model: str) -> str:
    """The store key of ``model``'s served record."""
    return f"{model}/{SERVED_FOLDER}"


def publish_served(store: ArtifactStore, model: str, deployment: Deployment | None) -> None:
    """Record in the store what ``model``'s endpoint serves now (``None``: nothing), atomically."""
    from kiln.tasks.serving.deployment import utc_now

    body = {"model": model, "deployment": deployment.to_dict() if deployment is not None else None,
            "published_at": utc_now(), "host": socket.gethostname()}
    with store.writer(served_key(model)) as out:
        write_json(out / DEPLOYMENT_FILE, body)


def read_served(store: ArtifactStore, model: str) -> dict[str, Any] | None:
    """The store's record of ``model`` (``None``: it was never deployed through this store)."""
    key = served_key(model)
    return read_json(store.path(key) / DEPLOYMENT_FILE) if store.exists(key) else None


def materialise(endpoint: Endpoint, store: ArtifactStore, registry: Registry) -> Deployment | None:
    """Write ``endpoint``'s local deployment file from the store's record when the file is missing or older, the
    champion's (and a canary's) bundle fetched from the registry into this host's bundle cache.

    Returns:
        The deployment written; ``None`` when the local file is current or the store names nothing to serve.

    Raises:
        DeploymentError: the record is invalid.
        RegistryError: a version it names is not in the registry.
    """
    from kiln.tasks.serving.deployment import Deployment, DeploymentError, ModelRef, read_deployment, write_deployment

    record = read_served(store, endpoint.model)
    if record is None or record.get("deployment") is None:
        return None
    try:
        wanted = Deployment.from_dict(record["deployment"])
    except (TypeError, ValueError) as exc:
        raise DeploymentError(f"the served record {store.uri(served_key(endpoint.model))}: {exc}") from None
    if endpoint.deployment.is_file() and read_deployment(endpoint.deployment).updated_at >= wanted.updated_at:
        return None
    cache = bundle_cache(endpoint.model)

    def fetched(version: str) -> str:
        return str(registry.fetch_bundle(registry.version(endpoint.model, version), cache))

    local = replace(wanted, champion=ModelRef(wanted.champion.version, fetched(wanted.champion.version)))
    if wanted.canary is not None:
        local = replace(local, canary=replace(wanted.canary, bundle=fetched(wanted.canary.version)))
    write_deployment(endpoint.deployment, local)
    log.info("%s: serving champion %s%s as the store records (deployed from %s at %s)", endpoint.model,
             local.champion.version, f", canary {local.canary.version}" if local.canary else "",
             record.get("host"), record.get("published_at"))
    return local


def materialise_all() -> dict[str, str]:
    """:func:`materialise` every valid pipeline's endpoint; ``{pipeline: what happened}``. A pipeline that fails
    is reported and the others go on."""
    from kiln.tasks.pipeline.context import default_store
    from kiln.tasks.settings import get_settings
    from kiln.tasks.spec import load_specs
    from kiln.tasks.tracking.registry import Registry

    store, registry = default_store(), None
    outcome = {}
    for _path, spec in load_specs(get_settings().pipelines_dir)[0]:
        endpoint = Endpoint.of(spec)
        try:
            if read_served(store, spec.name) is None:
                continue
            registry = registry or Registry.from_settings()
            written = materialise(endpoint, store, registry)
            outcome[spec.name] = f"champion {written.champion.version} from the store" if written else "current"
        except Exception as exc:  # noqa: BLE001 - one pipeline's record must not keep the others from serving
            log.error("cannot serve %s from the store's record: %s", spec.name, exc)
            outcome[spec.name] = f"error: {type(exc).__name__}: {exc}"
    return outcome


def materialise_in_subprocess(env: Mapping[str, str]) -> dict[str, str] | None:
    """:func:`materialise_all` in a process of its own with ``env`` (what ``kiln up`` runs before its model servers
    start: the registry's client stays out of the supervisor); its outcome, ``None`` when it failed (logged: the
    local deployments are served as they are)."""
    proc = subprocess.run([sys.executable, "-m", "kiln.tasks.pipeline.served"], env=dict(env), capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        log.error("reading what the artifact store records as served failed; serving the local deployments:\n%s",
                  proc.stderr[-3000:])
        return None
    outcome = json.loads(proc.stdout or "{}")
    if outcome:
        log.info("served records in the artifact store: %s", outcome)
    return outcome


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.tasks.pipeline.served``: materialise every pipeline's deployment; print the outcome as
    JSON."""
    argparse.ArgumentParser(prog="python -m kiln.tasks.pipeline.served", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(materialise_all()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
