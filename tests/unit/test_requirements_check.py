"""``code.requirements`` against kiln's own environment (the local launcher's check before torchrun starts).

Real distributions of the test environment: torch, PyYAML (with its version) and packaging are installed,
``kiln-no-such-package`` is not.
"""

from __future__ import annotations

import importlib.metadata

import pytest

from kiln.tasks.launch.requirements_check import RequirementError, check_installed, parse_requirements, unsatisfied
from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import TrainConfig

PYYAML = importlib.metadata.version("PyYAML")


@pytest.mark.parametrize("lines", [
    [],
    ["torch"],
    ["torch==2.13.0"],  # matches the local version 2.13.0+cpu, as pip would
    [f"PyYAML=={PYYAML}", "packaging>=20"],
    ["pyyaml"],  # names are compared normalised
    ['kiln-no-such-package ; sys_platform == "win32"'],  # a marker that does not apply here
    ["uvicorn[standard]"],  # an extra whose requirements are installed (kiln's own pyproject asks for them)
], ids=["none", "bare-name", "public-version-of-local", "pins", "normalised-name", "marker", "extras"])
def test_satisfied_lines_pass(lines):
    check_installed(lines)


def test_each_unsatisfied_line_is_named_with_what_is_installed_and_the_fix():
    lines = ["torch", "kiln-no-such-package==1.0", "PyYAML<1"]
    with pytest.raises(RequirementError) as info:
        check_installed(lines)
    message = str(info.value)
    assert message.startswith("code.requirements: 2 requirement(s)")
    assert "'kiln-no-such-package==1.0': kiln-no-such-package is not installed" in message
    assert f"'PyYAML<1': pyyaml {PYYAML} is installed, which is not <1" in message
    assert "-m pip install kiln-no-such-package==1.0 'PyYAML<1'" in message
    assert "training.launcher: docker" in message
    assert [line for line, _ in info.value.problems] == ["kiln-no-such-package==1.0", "PyYAML<1"]


def test_an_extra_whose_requirements_are_missing_is_named():
    # docker is installed, its 'ssh' extra (paramiko) is not; an extra nobody declares asks for nothing, as in pip.
    assert unsatisfied(["docker[ssh]", "docker[kiln-no-such-extra]"]) == [("docker[ssh]", "paramiko is not installed")]


@pytest.mark.parametrize("line", ["-r other.txt", "--index-url https://example.org", "torch >>= 2", ""],
                         ids=["pip-option", "index-url", "bad-specifier", "empty"])
def test_a_malformed_line_is_refused_naming_its_position(line):
    with pytest.raises(RequirementError, match=r"code\.requirements\[1\] .* is not a PEP 508 requirement"):
        parse_requirements(["torch", line])


def test_the_local_launcher_checks_them_before_it_starts_anything(tmp_path):
    config = TrainConfig(features_dir=str(tmp_path / "features"), output_dir=str(tmp_path / "out"),
                         checkpoint_dir=str(tmp_path / "ckpt"), task="classification", model=ModelSpec(),
                         training=TrainingSpec(), requirements=("torch", "kiln-no-such-package>=2"))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(RequirementError, match=r"'kiln-no-such-package>=2': kiln-no-such-package is not installed"):
        LocalTorchrunLauncher().launch(config, nproc=1, workdir=work)
    assert list(work.iterdir()) == []  # no config file, no log: torchrun never started
