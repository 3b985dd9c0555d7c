"""kiln as a package: the wheel holds `kiln` alone, and installed beside an Airflow it is a provider and a command.

Users add kiln to an Airflow deployment that may have modules called `tasks` or `operators` of its own (common in
DAG folders), so the wheel installs one import name, `kiln`. The install goes into a fresh virtual environment
that reaches an existing Airflow installation (this project's own, through a path entry, as a site's shared
packages would be): the test then sees what a user sees after `pip install kiln`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from the checkout's files (a copy: an earlier build's leftovers must not fill gaps)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True, timeout=300)
    (found,) = out.glob("kiln-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (no dependencies) and this project's Airflow and libraries on its path;
    returns its bin folder."""
    env_dir = tmp_path_factory.mktemp("venv") / "fresh"
    venv.create(env_dir, with_pip=False, symlinks=True)
    site = next((env_dir / "lib").glob("python3.*/site-packages"))
    shared = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p, "airflow").is_dir())
    # A plain path entry: the project's own editable kiln (activated by a .pth file there) stays out of sight.
    (site / "shared_airflow.pth").write_text(f"{shared}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return env_dir / "bin"


def _run(bindir: Path, *argv: str, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "KILN_", "PYTHON"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False", PATH=f"{bindir}{os.pathsep}{env['PATH']}")
    return subprocess.run([str(bindir / argv[0]), *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_wheel_holds_the_kiln_package_and_every_subpackage(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"kiln", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, sorted(top)
    # Every package folder of the checkout is in the wheel (pyproject lists them: a new one must be added there).
    folders = {p.parent.relative_to(REPO) for root in ("tasks", "operators")
               for p in (REPO / root).rglob("__init__.py")}
    assert folders, "no packages found"
    missing = sorted(str(f) for f in folders if f"kiln/{f.as_posix()}/__init__.py" not in names)
    assert missing == [], f"packages missing from the wheel (add them to [tool.setuptools] packages): {missing}"
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kiln = kiln.tasks.cli.main:main" in entry_points
    assert "provider_info = kiln.operators.provider:get_provider_info" in entry_points


def test_installed_beside_airflow_it_is_a_provider_and_a_command(installed: Path, tmp_path: Path) -> None:
    # The shared Airflow's code, run by this environment's interpreter (its own `airflow` script lives there).
    listed = _run(installed, "python", "-m", "airflow", "providers", "list", "--output", "plain", cwd=tmp_path,
                  home=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert any(line.split()[:1] == ["kiln"] for line in listed.stdout.splitlines()), listed.stdout
    links = _run(installed, "python", "-m", "airflow", "providers", "links", "--output", "plain", cwd=tmp_path,
                 home=tmp_path)
    assert "kiln.operators.links.GateDecisionLink" in links.stdout, links.stdout + links.stderr[-2000:]

    helped = _run(installed, "kiln", "--help", cwd=tmp_path, home=tmp_path)
    assert helped.returncode == 0, helped.stderr
    for command in ("run", "models", "pools", "serve", "up", "down", "status"):
        assert command in helped.stdout
        sub = _run(installed, "kiln", command, "--help", cwd=tmp_path, home=tmp_path)
        assert sub.returncode == 0 and "examples:" in sub.stdout, (command, sub.stdout, sub.stderr)


def test_no_top_level_tasks_or_operators_module_is_installed(installed: Path, tmp_path: Path) -> None:
    """A DAG folder's own `tasks` or `operators` module keeps its name: kiln takes only `kiln`."""
    code = ("import importlib.util as u, kiln.tasks.spec, kiln.operators.provider;"
            "print(u.find_spec('tasks'), u.find_spec('operators'), kiln.tasks.spec.__file__)")
    found = _run(installed, "python", "-c", code, cwd=tmp_path, home=tmp_path)
    assert found.returncode == 0, found.stderr
    tasks_spec, operators_spec, spec_file = found.stdout.split()
    assert (tasks_spec, operators_spec) == ("None", "None")
    assert "site-packages/kiln/tasks/spec" in spec_file, "kiln is imported from the installed wheel"


def test_the_environment_satisfies_every_requirement_the_wheel_declares() -> None:
    """What the wheel asks pip for is what kiln imports (deptry checks the other direction in make test)."""
    unmet = []
    for text in metadata.requires("kiln") or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{req} (installed {version})")
    assert unmet == []
