"""The model registry: MLflow's, with one registered model per pipeline and a ``champion`` alias.

Every evaluated candidate becomes a model version: an MLflow Model (pyfunc flavor, :mod:`.pyfunc_model`) logged
from its training run and holding its bundle, tagged with the data hash, spec hash, code version and run ids. So
``mlflow.pyfunc.load_model("models:/<pipeline>@champion")`` predicts raw rows as kiln's model server does.

Only :meth:`Registry.set_champion` moves the ``champion`` alias (the gate's pass, an explicit approval, or a
rollback), and each move is appended to the registered model's ``kiln.champion_history`` tag (who, when, why),
which is what :meth:`Registry.rollback` walks back through.

The history is also the check on the alias: :meth:`Registry.champion` refuses an alias that names another version
than the last recorded move (someone moved it with a raw MLflow call), naming both, until a person approves a
version (``kiln models approve``). Callers serialise their moves with the model's champion lock
(:mod:`kiln.tasks.pipeline.champion_lock`); ``expected`` makes a move a compare-and-set on top of that.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model

log = logging.getLogger(__name__)

CHAMPION = "champion"
#: Registered-model tag holding the alias moves, newest last (JSON list, bounded to ``HISTORY_LIMIT`` entries).
HISTORY_TAG = "kiln.champion_history"
HISTORY_LIMIT = 25
#: Reads of the alias and the history, 0.2 s apart, before a disagreement between them is reported.
MISMATCH_READS = 10
#: Model-version tag tying a version to the pipeline run that produced it (one version per run).
RUN_KEY_TAG = "kiln.run_key"
#: Model-version tag naming the MLflow logged model the version is (OSS MLflow keeps no ``model_id`` on a version).
MODEL_ID_TAG = "kiln.model_id"
#: Folder of the training run's MLflow artifacts that is the source of versions registered before kiln logged
#: MLflow Models: the bare bundle (:meth:`Registry.fetch_bundle` still reads them).
BUNDLE_ARTIFACT_PATH = "bundle"


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out (unknown model or version, nothing to roll back to)."""


class ChampionMismatchError(RegistryError):
    """The ``champion`` alias names another version than kiln's last recorded move: it was moved outside kiln."""


class ChampionMovedError(RegistryError):
    """A compare-and-set move found another champion than the one it expected."""


#: ``expected`` of :meth:`Registry.set_champion` when any current champion will do.
ANY = object()


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version of a pipeline's model."""

    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    model_id: str = ""
    """The MLflow logged model the version is (empty for versions whose source is a bare bundle folder)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "version": self.version, "run_id": self.run_id, "source": self.source,
                "tags": dict(self.tags), "aliases": list(self.aliases), "model_id": self.model_id}


def _info(mv: Any) -> ModelVersionInfo:
    return ModelVersionInfo(name=mv.name, version=str(mv.version), run_id=mv.run_id or "", source=mv.source,
                            tags=dict(mv.tags or {}), aliases=tuple(getattr(mv, "aliases", None) or ()),
                            model_id=(mv.tags or {}).get(MODEL_ID_TAG) or getattr(mv, "model_id", None) or "")


class Registry:
    """MLflow model registry access for kiln's pipelines (a stateless client: safe to make per call)."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    @classmethod
    def from_settings(cls) -> Registry:
        """The registry ``KILN_MLFLOW_TRACKING_URI`` names, with MLflow's artifact store reachable (versions'
        bundles are logged to, and fetched from, the MLflow artifact root, which may be on S3)."""
        from kiln.tasks.settings import get_settings
        from kiln.tasks.tracking.runs import use_s3_endpoint

        use_s3_endpoint()
        return cls(get_settings().mlflow_tracking_uri)

    def register(self, name: str, run_id: str, bundle_dir: Path, tags: dict[str, str]) -> ModelVersionInfo:
        """Log ``bundle_dir`` as an MLflow Model from the training run and register it as a new version of ``name``.

        Idempotent per pipeline run: a retried step finds the version already made for ``tags[RUN_KEY_TAG]``
        and returns it instead of adding another (and reuses a logged model that a cut-short try left unversioned).

        Args:
            name: the registered model (the pipeline name).
            run_id: the MLflow run that trained the model.
            bundle_dir: the exported bundle folder.
            tags: version tags; must include ``RUN_KEY_TAG``.

        Raises:
            BundleError: ``bundle_dir`` is not a loadable bundle.
        """
        existing = self.find_by_run_key(name, tags[RUN_KEY_TAG])
        if existing is not None:
            log.info("model %s version %s already registered for %s", name, existing.version, tags[RUN_KEY_TAG])
            return existing
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description=f"Models of the kiln pipeline '{name}'.")
        model = self._logged_model(name, run_id, Path(bundle_dir), tags)
        # The source is the logged model's own location, not ``models:/<model_id>``: a registry store resolves that
        # form with the process-wide tracking URI, which need not be this client's (it is not in the tests).
        mv = self.client.create_model_version(name, model.artifact_location, run_id=run_id,
                                              tags={**tags, MODEL_ID_TAG: model.model_id}, model_id=model.model_id)
        log.info("registered %s version %s (MLflow model %s) from run %s", name, mv.version, model.model_id, run_id)
        return _info(mv)

    def _logged_model(self, name: str, run_id: str, bundle_dir: Path, tags: dict[str, str]) -> Any:
        """The READY logged model of this pipeline run: one that an earlier try left, or a new one."""
        from kiln.tasks.tracking import pyfunc_model  # MLflow's pyfunc machinery: only registering pays for it

        experiment_id = self.client.get_run(run_id).info.experiment_id
        # Filtered on the status here: the SQL store does not match a ``status = 'READY'`` filter (MLflow 3.17).
        left = [m for m in self.client.search_logged_models(
            [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{tags[RUN_KEY_TAG]}'")
            if m.status == LoggedModelStatus.READY]
        if left:
            log.info("reusing MLflow model %s logged for %s by an earlier try", left[0].model_id, tags[RUN_KEY_TAG])
            return left[0]
        model = self.client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags,
                                                model_type="kiln-bundle")
        try:
            with tempfile.TemporaryDirectory(prefix="kiln-mlflow-model-") as tmp:
                local = pyfunc_model.save_model(bundle_dir, Path(tmp) / "model", Model(
                    artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                    model_id=model.model_id))
                self.client.log_model_artifacts(model.model_id, str(local))
            self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        except BaseException:
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        return self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)

    def find_by_run_key(self, name: str, run_key: str) -> ModelVersionInfo | None:
        """The version registered for one pipeline run, if any."""
        found = self.client.search_model_versions(f"name = '{name}' and tags.`{RUN_KEY_TAG}` = '{run_key}'")
        return _info(found[0]) if found else None

    def version(self, name: str, version: str) -> ModelVersionInfo:
        """One version.

        Raises:
            RegistryError: no such model or version.
        """
        try:
            return _info(self.client.get_model_version(name, str(version)))
        except MlflowException:
            known = ", ".join(v.version for v in self.versions(name)) or "none"
            raise RegistryError(f"model '{name}' has no version {version!r} (versions: {known})") from None

    def versions(self, name: str) -> list[ModelVersionInfo]:
        """All versions of ``name``, oldest first (empty when the model does not exist)."""
        found = [_info(mv) for mv in self.client.search_model_versions(f"name = '{name}'")]
        # Search results carry no aliases: they are read from the registered model (alias -> version).
        try:
            aliases = self.client.get_registered_model(name).aliases or {}
        except MlflowException:
            aliases = {}
        of: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            of.setdefault(str(version), []).append(alias)
        found = [replace(v, aliases=tuple(sorted(of.get(v.version, ())))) for v in found]
        return sorted(found, key=lambda v: int(v.version))

    def champion(self, name: str, *, verified: bool = True) -> ModelVersionInfo | None:
        """The version the ``champion`` alias points at, or ``None`` (no model yet, or never promoted).

        Args:
            name: the registered model.
            verified: check the alias against the last recorded move first (``False`` only to repair it).

        Raises:
            ChampionMismatchError: the alias does not name the version kiln's history last moved it to.
        """
        # A move writes the history, then the alias: a reader in between sees them disagree for a few
        # milliseconds (the mover holds the champion lock, which readers do not take), so a mismatch is read again
        # before it is believed.
        for attempt in range(MISMATCH_READS):
            try:
                found: ModelVersionInfo | None = _info(self.client.get_model_version_by_alias(name, CHAMPION))
            except MlflowException:
                found = None
            if not verified:
                return found
            try:
                self._verify(name, found.version if found else None, self.history(name))
                return found
            except ChampionMismatchError:
                if attempt == MISMATCH_READS - 1:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    @staticmethod
    def _verify(name: str, alias: str | None, history: list[dict[str, Any]]) -> None:
        recorded = str(history[-1]["version"]) if history else None
        if alias == recorded:
            return
        last = history[-1] if history else None
        said = (f"kiln's last recorded move ({last['action']} by {last['actor']} at {last['at']}) set version "
                f"{recorded}" if last else "kiln never moved it")
        raise ChampionMismatchError(
            f"the champion alias of '{name}' names {f'version {alias}' if alias else 'no version'}, but {said}: it "
            "was moved outside kiln, so kiln will not use it. Find out who moved it (the MLflow server's log), then "
            f"record the champion you want with `kiln models approve {name} VERSION --reason ...`")

    def history(self, name: str) -> list[dict[str, Any]]:
        """The champion alias moves, oldest first: ``{version, previous, action, reason, actor, at}``."""
        try:
            raw = self.client.get_registered_model(name).tags.get(HISTORY_TAG)
        except MlflowException:
            return []
        return json.loads(raw) if raw else []

    def set_champion(self, name: str, version: str, *, action: str, reason: str, actor: str = "kiln",
                     expected: object = ANY) -> ModelVersionInfo | None:
        """Point ``champion`` at ``version`` and record the move; returns the previous champion.

        The history entry is written before the alias: a move cut short in between is found by the check of
        :meth:`champion`, and finished by the same move's retry.

        Args:
            name: the registered model.
            version: the version to promote.
            action: ``gate``, ``approve`` or ``rollback`` (recorded). An approval is also how a person repairs an
                alias moved outside kiln: it does not check the alias against the history.
            reason: why, in a sentence (recorded).
            actor: who moved it (a DAG run, a user).
            expected: the champion version the caller decided against (``None``: no champion); compare-and-set.

        Raises:
            RegistryError: the version does not exist.
            ChampionMismatchError: the alias was moved outside kiln (not for ``approve``).
            ChampionMovedError: the champion is not ``expected``.
        """
        target = self.version(name, version)
        previous = self.champion(name, verified=False)
        before = previous.version if previous else None
        history = self.history(name)
        last = history[-1] if history else None
        if last and str(last["version"]) == target.version and before == last["previous"] != target.version:
            log.warning("%s: finishing a champion move to version %s that was cut short", name, target.version)
            self.client.set_registered_model_alias(name, CHAMPION, target.version)
            return previous
        if action != "approve":
            self._verify(name, before, history)
        if expected is not ANY and before != expected:
            raise ChampionMovedError(f"the champion of '{name}' is version {before or 'none'}, not version "
                                     f"{expected or 'none'} that version {target.version} was judged against")
        entry = {"version": target.version, "previous": before, "action": action, "reason": reason, "actor": actor,
                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*history, entry][-HISTORY_LIMIT:]))
        self.client.set_registered_model_alias(name, CHAMPION, target.version)
        self.client.set_model_version_tag(name, target.version, "kiln.promoted", f"{action}: {reason}"[:4000])
        log.info("%s champion: version %s -> %s (%s: %s)", name, before or "none", target.version, action, reason)
        return previous

    def rollback_target(self, name: str) -> str:
        """The version a rollback without an explicit target returns to: the champion before the current one.

        The history is read as a stack: a promotion or approval pushes its version, a rollback pops back down to
        the version it restored. So two rollbacks in a row go two champions back, never forth again.

        Raises:
            RegistryError: there is no earlier champion.
        """
        current = self.champion(name)
        if current is None:
            raise RegistryError(f"model '{name}' has no champion to roll back from")
        stack: list[str] = []
        for entry in self.history(name):
            version = str(entry["version"])
            if entry["action"] == "rollback" and version in stack:
                del stack[stack.index(version) + 1:]
            else:
                stack = [v for v in stack if v != version] + [version]
        if stack and stack[-1] == current.version and len(stack) >= 2:
            return stack[-2]
        raise RegistryError(f"model '{name}' has no earlier champion than version {current.version}; name the "
                            "version to roll back to")

    def bundle_uri(self, version: ModelVersionInfo) -> str:
        """Where a version's bundle lives in the artifact store of MLflow (``s3://...`` in production): inside the
        version's MLflow Model, or the source itself for versions registered before kiln logged MLflow Models."""
        from kiln.tasks.tracking.pyfunc_model import MODEL_BUNDLE_PATH

        if not version.model_id:
            return version.source
        location = self.client.get_model_version_download_uri(version.name, version.version)
        return f"{location.rstrip('/')}/{MODEL_BUNDLE_PATH}"

    def fetch_bundle(self, version: ModelVersionInfo, cache_dir: Path) -> Path:
        """A local copy of a version's bundle under ``cache_dir/v<version>`` (downloaded once, atomically).

        Versions are immutable, so a cached copy is reused as it is. The bundle is read from inside the version's
        MLflow Model, or is the source itself for versions registered before kiln logged MLflow Models.
        """
        import mlflow.artifacts

        final = Path(cache_dir) / f"v{version.version}"
        if final.is_dir():
            return final
        uri = self.bundle_uri(version)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-v{version.version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp),
                                                           tracking_uri=self.tracking_uri))
            try:
                got.rename(final)
            except OSError:
                if not final.is_dir():  # another process fetched it first: theirs is the same immutable version
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final
