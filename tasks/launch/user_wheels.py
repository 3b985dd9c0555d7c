"""The requirements of a user image (:mod:`kiln.tasks.launch.user_image`), resolved and downloaded on this host.

This host's own pip, with its own configuration (indexes, wheel folders, proxy, CA bundle), resolves
``code.requirements`` constrained to the versions the base image already has, so kiln's pins (torch above all) stay,
and downloads the wheels the base lacks into the build context. :data:`INSTALL_SCRIPT` installs them in the build,
offline, and fails if any distribution of the base changed: the build needs no network and no credentials.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from kiln.tasks.launch.requirements_check import FIELD, RequirementError, parse_requirements
from kiln.tasks.processes import OutputLog, start_process

log = logging.getLogger(__name__)

#: Runs in the build: installs the wheels resolved on the host, offline, and checks that the base kept its own.
INSTALL_SCRIPT = r'''
import importlib.metadata, importlib.util, json, pathlib, re, shutil, subprocess, sys
here = pathlib.Path(__file__).parent
def installed():
    return {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
            for d in importlib.metadata.distributions() if d.metadata["Name"]}
before = installed()
if importlib.util.find_spec("pip"):
    pip = [sys.executable, "-m", "pip"]
else:  # kiln's CPU test images carry no pip: run the interpreter's bundled wheel without installing it
    import ensurepip
    pip = [sys.executable, str(sorted((pathlib.Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))[-1])
           + "/pip"]
wheels = sorted(str(p) for p in (here / "wheels").glob("*.whl"))
if wheels:
    done = subprocess.run(pip + ["install", "--no-index", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
                                 "--no-warn-script-location", "--root-user-action=ignore", *wheels])
    if done.returncode:
        sys.exit(done.returncode)
after = installed()
changed = [f"{n} {v} -> {after.get(n, 'removed')}" for n, v in sorted(before.items()) if after.get(n) != v]
missing = [f"{n}=={v}" for n, v in json.loads((here / "expected.json").read_text()).items() if after.get(n) != v]
if changed or missing:
    print("kiln: the requirements " + (f"changed the base image's {', '.join(changed)}" if changed else
          f"did not install {', '.join(missing)}"))
    sys.exit(3)
print(f"kiln: installed {len(wheels)} distribution(s); the base image's {len(before)} are unchanged")
shutil.rmtree(here)
'''

def stage_wheels(dists: dict[str, str], base: str, requirements: list[str], folder: Path, deadline: float) -> None:
    """Resolve ``requirements`` for a base image whose distributions are ``dists`` with this host's pip, and put
    the wheels it lacks, the install script and the expected versions into ``folder`` of the build context.

    Raises:
        RequirementError: pip cannot resolve or fetch them (a name or version that does not exist, a conflict with
            the base's packages).
    """
    kept = _public_versions(dists)
    work = folder.parent / "pip"
    work.mkdir()
    (work / "requirements.txt").write_text("\n".join(requirements) + "\n")
    # Constraints, not requirements: a user line may need what the base has only at the base's version.
    (work / "constraints.txt").write_text("".join(f"{name}=={v}\n" for name, v in sorted(kept.items())))
    report = work / "report.json"
    log.info("resolving %d requirement(s) against the %d distributions of %s with this host's pip",
             len(requirements), len(kept), base)
    _pip(["install", "--dry-run", "--ignore-installed", "--report", str(report), "-c", str(work / "constraints.txt"),
          "-r", str(work / "requirements.txt")], requirements, base, kept, deadline)
    fetch: dict[str, tuple[str, str]] = {}  # name -> (version, what pip wheel gets)
    for item in json.loads(report.read_text())["install"]:
        name, version = canonicalize_name(item["metadata"]["name"]), item["metadata"]["version"]
        if kept.get(name) == _public(version):
            continue  # the base has it (the in-image pip keeps it)
        fetch[name] = (version, _direct_reference(name, item) if item.get("is_direct") else f"{name}=={version}")
    wheels = folder / "wheels"
    wheels.mkdir(parents=True)
    if fetch:
        log.info("fetching %d wheel(s) the base image lacks: %s", len(fetch),
                 ", ".join(f"{n}=={v}" for n, (v, _) in sorted(fetch.items())))
        _pip(["wheel", "--no-deps", "--wheel-dir", str(wheels), *(ref for _, ref in fetch.values())],
             requirements, base, kept, deadline)
    else:
        log.info("the base image already has everything %s asks for", FIELD)
    (folder / "expected.json").write_text(json.dumps({n: v for n, (v, _) in fetch.items()}))
    (folder / "install.py").write_text(INSTALL_SCRIPT)


def _public_versions(dists: dict[str, str]) -> dict[str, str]:
    """``{canonical name: public version}``: ``torch==2.13.0`` also matches the base's ``2.13.0+cu128``, whose
    build this host's indexes need not have."""
    kept: dict[str, str] = {}
    for name, version in dists.items():
        public = _public(version)
        if public:
            kept[canonicalize_name(name)] = public
    return kept


def _public(version: str) -> str | None:
    try:
        return Version(version).public
    except InvalidVersion:
        return None


def _direct_reference(name: str, item: dict[str, Any]) -> str:
    """``name @ url`` for a requirement pip resolved to a URL (a wheel, an archive, a VCS commit)."""
    info = item["download_info"]
    url = info["url"]
    if "vcs_info" in info:
        url = f"{info['vcs_info']['vcs']}+{url}@{info['vcs_info']['commit_id']}"
    return f"{name} @ {url}"


class _PipOutput(OutputLog):
    """pip's output without its notes about configured index folders that lack a package (one per index and
    package: they would crowd out the error)."""

    def write(self, line: str) -> None:
        if "is ignored: it is neither a file nor a directory" not in line:
            super().write(line)


def _pip(args: list[str], requirements: list[str], base: str, kept: dict[str, str], deadline: float) -> None:
    """Run this interpreter's pip (its configuration applies: indexes, wheel folders, CA bundle, proxy).

    Raises:
        RequirementError: pip failed or ran out of time; names the lines pip's errors mention (else all), what the
            base image has of them, and pip's last lines.
    """
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    output = _PipOutput(tail_lines=30, on_line=lambda line: log.info("pip: %s", line))
    proc = start_process(cmd, output=output, die_with_parent=True)
    try:
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        proc.stop(5, what="pip")
        code = None
    proc.join_output(timeout=5)
    if code == 0:
        return
    tail = "\n".join(output.tail)
    errors = "\n".join(line for line in output.tail if line.startswith("ERROR"))
    named = _lines_named(requirements, errors) or requirements
    which = ", ".join(repr(line) for line in named)
    names = sorted({canonicalize_name(r.name) for r in parse_requirements(named)})
    has = [f"{n} {kept[n]}" for n in names if n in kept]
    having = f"; the image has {', '.join(has)}, which kiln keeps" if has else ""
    what = "did not finish in time" if code is None else "failed"
    raise RequirementError(
        f"{FIELD}: pip cannot install {which} into the training image FROM {base} (resolving on this host for "
        f"Python {sys.version_info.major}.{sys.version_info.minor}: {what}{having}). Fix or remove the line: a name "
        f"and version that exist on this host's package indexes and fit the image's packages. pip's last lines:\n"
        f"{tail}", [(line, tail) for line in named])


def _lines_named(requirements: list[str], text: str) -> list[str]:
    """The requirement lines whose project name ``text`` mentions."""
    mentioned = {canonicalize_name(word) for word in re.findall(r"[A-Za-z0-9][A-Za-z0-9._-]*", text)}
    return [line for line, req in zip(requirements, parse_requirements(requirements), strict=True)
            if canonicalize_name(req.name) in mentioned]
