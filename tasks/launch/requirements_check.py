"""A pipeline's ``code.requirements`` against the Python environment that runs its training job.

The local launcher runs the user's code in kiln's own environment, so it checks, before it starts torchrun, that
every requirement line is satisfied by the installed distributions (a missing package would otherwise surface as
an ``ImportError`` on every rank, minutes later and without naming the spec field). The Docker launcher builds an
image holding them instead (:mod:`kiln.tasks.launch.user_image`). Both read the lines with :func:`parse_requirements`.
"""

from __future__ import annotations

import importlib.metadata
import shlex
import sys
from collections.abc import Sequence

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

#: The spec field every message names.
FIELD = "code.requirements"


class RequirementError(ValueError):
    """A ``code.requirements`` line is malformed, not satisfied by the environment, or cannot be installed.

    ``problems`` holds ``(line, what is wrong)`` pairs; the message names the field, each line and the fix.
    """

    def __init__(self, message: str, problems: Sequence[tuple[str, str]] = ()):
        self.problems = list(problems)
        super().__init__(message)


def parse_requirements(lines: Sequence[str]) -> list[Requirement]:
    """Parse PEP 508 requirement lines (``name[extras] specifier ; marker`` or ``name @ url``).

    Pip options (``-r``, ``--index-url``, ``-e``) are not requirements and are refused: where packages come from is
    the installation's pip configuration, not the pipeline's.

    Raises:
        RequirementError: a line that is not a PEP 508 requirement, naming its position and the parser's reason.
    """
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append(Requirement(line))
        except InvalidRequirement as exc:
            raise RequirementError(f"{FIELD}[{i}] {line!r} is not a PEP 508 requirement ({exc}); write it as "
                                   "'name', 'name==1.2' or 'name[extra]>=1,<2' (pip options such as -r or "
                                   "--index-url are not allowed)", [(line, str(exc))]) from exc
    return parsed


def unsatisfied(lines: Sequence[str]) -> list[tuple[str, str]]:
    """The lines the installed distributions do not satisfy, each with what is installed instead.

    A line whose environment marker does not apply here (``; sys_platform == "win32"``) is satisfied. A line with
    extras also needs the extras' own requirements. A ``name @ url`` line is satisfied by any installed version
    (the URL's version cannot be known without fetching it).

    Raises:
        RequirementError: a malformed line (see :func:`parse_requirements`).
    """
    problems = []
    for line, req in zip(lines, parse_requirements(lines), strict=True):
        if req.marker is not None and not req.marker.evaluate():
            continue
        problem = _problem(req)
        if problem is None:
            problem = next(filter(None, (_problem(extra) for extra in _extra_requirements(req))), None)
        if problem is not None:
            problems.append((line, problem))
    return problems


def check_installed(lines: Sequence[str]) -> None:
    """Fail unless every line of ``code.requirements`` is satisfied by this Python environment.

    Raises:
        RequirementError: the message lists each unsatisfied line with what is installed ("not installed" or the
            installed version) and the fix: install them into this environment, or use the Docker launcher,
            which builds an image with them.
    """
    problems = unsatisfied(lines)
    if not problems:
        return
    listing = "\n".join(f"  - {line!r}: {problem}" for line, problem in problems)
    install = " ".join(shlex.quote(line) for line, _ in problems)
    raise RequirementError(
        f"{FIELD}: {len(problems)} requirement(s) of the pipeline are not satisfied by the Python environment that "
        f"runs the local launcher ({sys.prefix}):\n{listing}\nFix: install them into that environment "
        f"({shlex.quote(sys.executable)} -m pip install {install}), or set training.launcher: docker, which builds "
        "a training image with them (docs: README, 'Bring your own model')", problems)


def _problem(req: Requirement) -> str | None:
    """What is wrong with one requirement here, or ``None`` when an installed distribution satisfies it."""
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return f"{canonicalize_name(req.name)} is not installed"
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        return f"{canonicalize_name(req.name)} {version} is installed, which is not {req.specifier}"
    return None


def _extra_requirements(req: Requirement) -> list[Requirement]:
    """The requirements an installed distribution declares for the extras ``req`` asks for (one level)."""
    if not req.extras:
        return []
    found = []
    for text in importlib.metadata.requires(req.name) or []:
        dep = Requirement(text)
        if dep.marker is not None and any(dep.marker.evaluate({"extra": e}) for e in req.extras) \
                and not dep.marker.evaluate({"extra": ""}):
            found.append(dep)
    return found
