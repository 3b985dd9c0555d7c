"""Training images that hold a pipeline's own code and requirements: ``kiln-train-user:<content hash>``.

The Docker launcher runs such an image when the job has a code folder (``code.path``) or ``code.requirements``. It
is built FROM the training base image (``training.docker.image`` or ``KILN_TRAIN_IMAGE``) with:

- the requirements, resolved and downloaded *on this host* (:mod:`kiln.tasks.launch.user_wheels`) by its own pip
  with its own configuration (indexes, wheel folders, proxy, CA bundle) and constrained to the versions the base
  image already has, so kiln's pins (torch above all) stay; a build step installs those wheels offline
  (``--no-index --no-deps``) and fails if any distribution of the base changed. The build needs no network and no
  credentials, and works the same on a remote engine (the wheels travel in the build context);
- the code folder at :data:`USER_CODE_DIR`, compiled (the containers' root filesystem is read-only).

The tag's hash covers the base image's id, the requirement lines, the code (:func:`code_hash`) and this recipe;
the image carries it as :data:`INPUT_HASH_LABEL` (as ``docker/build-test-image.sh`` does), and an image with the
same hash is reused without a build. Builds of one image are serialised by a lock file; a failed build leaves
nothing tagged. Requirement lines are used as written: pin them (``tabulate==0.9.0``), since an unpinned line is not
resolved again while its image exists.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docker.client import DockerClient
from docker.errors import DockerException, ImageNotFound

from kiln.tasks.launch.requirements_check import FIELD, RequirementError, parse_requirements
from kiln.tasks.launch.user_wheels import INSTALL_SCRIPT, stage_wheels
from kiln.tasks.training.user_code import MAX_CODE_BYTES, MAX_CODE_FILES, UserCodeError, code_hash

log = logging.getLogger(__name__)

#: Where the image holds the pipeline's code; the launcher sets ``TrainConfig.code_dir`` to it.
USER_CODE_DIR = "/opt/kiln/user_code"
#: The repository of the built images; the tag is the first 16 hex digits of the input hash.
IMAGE_REPOSITORY = "kiln-train-user"
#: The label holding the full input hash (the same label ``docker/build-test-image.sh`` uses).
INPUT_HASH_LABEL = "kiln.input-hash"
#: Label naming the base the image was built FROM (``name@id``); ``docker image ls --filter label=kiln.user-image``
#: lists every user image.
BASE_LABEL = "kiln.base"
USER_IMAGE_LABEL = "kiln.user-image"
#: Default bound on resolving, downloading and building, together.
BUILD_TIMEOUT_S = 1800

_DOCKERFILE = """\
# A pipeline's requirements and code on kiln's training image (kiln.tasks.launch.user_image).
ARG BASE
FROM ${{BASE}}
USER 0:0
{steps}USER {user}
"""
_REQUIREMENTS_STEP = """\
COPY requirements /tmp/kiln-requirements
RUN ["python", "/tmp/kiln-requirements/install.py"]
"""
_CODE_STEP = f"""\
COPY user_code {USER_CODE_DIR}
RUN ["python", "-m", "compileall", "-q", "{USER_CODE_DIR}"]
"""
_PROBE_SCRIPT = ("import importlib.metadata as m, json, platform, sys; print(json.dumps({'python': "
                 "list(sys.version_info[:2]), 'machine': platform.machine(), 'dists': {d.metadata['Name']: "
                 "d.version for d in m.distributions() if d.metadata['Name']}}))")
#: Everything of the recipe that decides the image, besides its inputs.
_RECIPE = hashlib.sha256("\0".join((_DOCKERFILE, _REQUIREMENTS_STEP, _CODE_STEP, INSTALL_SCRIPT)).encode())


class ImageBuildError(RuntimeError):
    """The user image could not be built (engine refusal, a base without Python, a failed build step); the
    message names the spec field or image and the fix. Nothing was tagged."""


@dataclass(frozen=True)
class UserImage:
    """A user image ready on one engine."""

    tag: str
    input_hash: str
    built: bool
    """False: an image with the same inputs was there already and was reused."""


def ensure_user_image(client: DockerClient, base: str, *, code_dir: str | Path | None,
                      requirements: Sequence[str], code_sha256: str | None = None,
                      timeout_s: float = BUILD_TIMEOUT_S) -> UserImage:
    """Build (or find) the image with ``code_dir`` at :data:`USER_CODE_DIR` and ``requirements`` installed.

    Args:
        client: the engine to build on.
        base: the training base image (name or id) on that engine.
        code_dir: the pipeline's code folder on this host (``code.path``), or ``None``.
        requirements: ``code.requirements`` lines.
        code_sha256: the code hash the job was configured with (``TrainConfig.code_hash``): the folder must still
            hash to it, so that the image holds the code the checkpoints were fingerprinted with.
        timeout_s: bound on waiting for another build, resolving, downloading and building.

    Raises:
        RequirementError: a line pip cannot resolve or install for the base image (names ``code.requirements``,
            the line and pip's last lines).
        UserCodeError: ``code.path`` is not a folder, too large, has a symlink out of it, or changed.
        ImageBuildError: the base is missing or unusable, or the engine failed the build.
    """
    requirements = list(requirements)
    parse_requirements(requirements)
    deadline = time.monotonic() + timeout_s
    base_image = _base_image(client, base)
    with tempfile.TemporaryDirectory(prefix="kiln-user-image-") as tmp:
        context = Path(tmp)
        code = _stage_code(Path(code_dir), context / "user_code", code_sha256) if code_dir else None
        digest = hashlib.sha256(json.dumps({"recipe": _RECIPE.hexdigest(), "base": base_image.id,
                                            "requirements": requirements, "code": code}).encode()).hexdigest()
        tag = f"{IMAGE_REPOSITORY}:{digest[:16]}"
        if _current(client, tag, digest):
            log.info("user image %s is up to date (%s=%s); not building", tag, INPUT_HASH_LABEL, digest[:16])
            return UserImage(tag, digest, built=False)
        with _build_lock(digest, deadline):
            if _current(client, tag, digest):  # built by the holder of the lock while this one waited
                log.info("user image %s was built by another launch meanwhile", tag)
                return UserImage(tag, digest, built=False)
            started = time.monotonic()
            log.info("building user image %s FROM %s (%d requirement(s)%s)", tag, base,
                     len(requirements), f", code from {code_dir}" if code_dir else "")
            steps = ""
            if requirements:
                _stage_requirements(client, base, base_image.id, requirements, context / "requirements", deadline)
                steps += _REQUIREMENTS_STEP
            if code:
                steps += _CODE_STEP
            user = base_image.attrs.get("Config", {}).get("User") or "0:0"
            (context / "Dockerfile").write_text(_DOCKERFILE.format(steps=steps, user=user))
            _build(client, context, tag, labels={INPUT_HASH_LABEL: digest, BASE_LABEL: f"{base}@{base_image.id}",
                                                 USER_IMAGE_LABEL: "1"},
                   base_id=base_image.id, requirements=requirements, timeout_s=max(deadline - time.monotonic(), 1))
            log.info("built user image %s in %.1f s", tag, time.monotonic() - started)
    return UserImage(tag, digest, built=True)


def _base_image(client: DockerClient, base: str) -> Any:
    try:
        return client.images.get(base)
    except ImageNotFound as exc:
        raise ImageBuildError(f"the training base image {base!r} (training.docker.image, default KILN_TRAIN_IMAGE) "
                              "is not on the engine; build it with `make image` or pull it") from exc
    except DockerException as exc:
        raise ImageBuildError(f"cannot look up the training base image {base!r}: {exc}") from exc


def _current(client: DockerClient, tag: str, digest: str) -> bool:
    try:
        labels = client.images.get(tag).labels or {}
    except ImageNotFound:
        return False
    return labels.get(INPUT_HASH_LABEL) == digest


@contextmanager
def _build_lock(digest: str, deadline: float) -> Iterator[None]:
    """One build of an image at a time on this host (the engine is machine-wide, so the lock is under the system's
    temporary folder, like ``docker/build-test-image.sh``'s)."""
    path = Path(tempfile.gettempdir()) / f"kiln-user-image-{digest[:16]}.lock"
    with open(path, "a") as fh:
        waiting = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ImageBuildError(f"timed out waiting for another build of {IMAGE_REPOSITORY}:"
                                          f"{digest[:16]} (lock {path})") from None
                if not waiting:
                    log.info("waiting for another launch that builds the same user image (lock %s)", path)
                    waiting = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stage_code(source: Path, dest: Path, expected: str | None) -> str:
    """Copy the code folder into the build context (the files :func:`code_hash` covers, readable by any user)
    and return the copy's hash, which must equal ``expected`` when given.

    Raises:
        UserCodeError: not a folder, over the size bounds, a symlink out of the folder, or changed code.
    """
    source = source.resolve()
    if not source.is_dir():
        raise UserCodeError("code.path", str(source), "is not a folder; point code.path at the pipeline's code folder")
    count, total = 0, 0
    for root, dirs, names in os.walk(source):
        # The same selection as code_hash: no caches, no hidden files or folders, no environments.
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules")]
        target = dest / Path(root).relative_to(source)
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        for name in names:
            if name.startswith(".") or name.endswith((".pyc", ".pyo")):
                continue
            path = Path(root) / name
            if path.is_symlink() and not (path.exists() and path.resolve().is_relative_to(source)):
                raise UserCodeError("code.path", str(source), f"{path.relative_to(source)} links out of the code "
                                    "folder (or nowhere); copy the file in instead of linking to it")
            count, total = count + 1, total + path.stat().st_size
            if count > MAX_CODE_FILES or total > MAX_CODE_BYTES:
                raise UserCodeError("code.path", str(source), f"holds more than {MAX_CODE_FILES} files or "
                                    f"{MAX_CODE_BYTES >> 20} MiB; keep data and environments out of the code folder")
            shutil.copyfile(path, target / name)
            executable = path.stat().st_mode & stat.S_IXUSR
            os.chmod(target / name, 0o755 if executable else 0o644)  # a service's umask 077 must not hide it
    staged = code_hash(dest)
    if expected and staged != expected:
        raise UserCodeError("code.path", str(source), f"changed since the job was configured (its code hash is now "
                            f"{staged[:12]}, the job's {expected[:12]}); retry the task so that it hashes the new code")
    return staged


def _stage_requirements(client: DockerClient, base: str, base_id: str, requirements: list[str], folder: Path,
                        deadline: float) -> None:
    """Check that the base image runs this host's Python, then stage its wheels (:mod:`user_wheels`) in ``folder``.

    Raises:
        RequirementError: pip cannot resolve or fetch them.
        ImageBuildError: the base has no usable Python, or a different Python or machine than this host.
    """
    probe = _probe(client, base, base_id)
    here = [sys.version_info.major, sys.version_info.minor]
    if probe["python"] != here or probe["machine"] != os.uname().machine:
        raise ImageBuildError(
            f"the training base image {base!r} has Python {'.'.join(map(str, probe['python']))} on "
            f"{probe['machine']}, but kiln resolves {FIELD} with this host's Python {'.'.join(map(str, here))} on "
            f"{os.uname().machine}; use a base image with the same Python version (training.docker.image)")
    stage_wheels(probe["dists"], base, requirements, folder, deadline)


def _probe(client: DockerClient, base: str, base_id: str) -> dict[str, Any]:
    """The base image's Python version, machine and installed distributions (from a throwaway container)."""
    try:
        out = client.containers.run(base_id, entrypoint=["python"], command=["-c", _PROBE_SCRIPT], remove=True,
                                    network_disabled=True, labels={USER_IMAGE_LABEL: "probe"})
        return dict(json.loads(out))
    except (DockerException, ValueError) as exc:
        raise ImageBuildError(f"cannot read the Python environment of the training base image {base!r} "
                              f"(`python -c ...` in it failed: {exc}); training.docker.image must name an image "
                              "with kiln's Python 3 on its PATH (build one with `make image`)") from exc


def _build(client: DockerClient, context: Path, tag: str, *, labels: dict[str, str], base_id: str,
           requirements: list[str], timeout_s: float) -> None:
    """``docker build`` the context (the engine's own builder; no BuildKit needed), its output in the log.

    Raises:
        RequirementError: the install step found the base changed or a wheel missing.
        ImageBuildError: any other failed step; intermediate containers are removed and nothing is tagged.
    """
    tail: deque[str] = deque(maxlen=25)
    error = None
    try:
        for chunk in client.api.build(path=str(context), tag=tag, labels=labels, buildargs={"BASE": base_id},
                                      rm=True, forcerm=True, pull=False, decode=True, timeout=int(timeout_s)):
            for line in str(chunk.get("stream", "")).splitlines():
                if line.strip():
                    tail.append(line)
                    log.info("build %s: %s", tag, line)
            if "error" in chunk:
                error = str(chunk["error"]).strip()
    except DockerException as exc:
        error = str(exc)
    except OSError as exc:  # the HTTP read timed out
        error = f"no answer from the engine within {timeout_s:.0f} s ({exc})"
    if error is None and _current(client, tag, labels[INPUT_HASH_LABEL]):
        return
    text = "\n".join(tail)
    if "kiln: the requirements" in text:
        raise RequirementError(f"{FIELD}: installing {requirements} into {tag} failed: {text.splitlines()[-1]}; "
                               "remove the requirement that replaces a package of kiln's image", [])
    raise ImageBuildError(f"building the training image {tag} failed: {error or 'no image was tagged'}; "
                          f"last build lines:\n{text}")
