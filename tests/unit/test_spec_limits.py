"""Spec files are external input: parsing one is bounded in size, depth, alias expansion and time, and a bad file
is named without hiding the others (issue 20, "Bounded, validated input everywhere")."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from kiln.tasks.spec import SpecError, load_spec, load_specs, yaml_reader
from kiln.tasks.spec.yaml_reader import SPEC_LIMITS, SpecLimits

MINIMAL = "name: {name}\nsource: {{uri: data.csv}}\ntarget: y\ntask: classification\n"


def _anchors(levels: int = 9, width: int = 9) -> list[str]:
    """Anchors of a billion-laughs bomb: each level is ``width`` aliases of the level below (width**levels)."""
    out = ['&a0 [' + ", ".join(['"lol"'] * width) + ']']
    out += [f'&a{i} [' + ", ".join([f"*a{i - 1}"] * width) + ']' for i in range(1, levels)]
    return out


def bomb_in_tags(name: str = "bomb") -> str:
    """Invalid spec: every error quotes its input, which once expanded is 9**9 strings."""
    return MINIMAL.format(name=name) + "tags: [" + ", ".join(_anchors()) + "]\n"


def bomb_in_kwargs(name: str = "bomb") -> str:
    """A spec that validates: the bomb hides in an expectation's free-form kwargs (blows up in spec_hash)."""
    kwargs = ", ".join(f"k{i}: {a}" for i, a in enumerate(_anchors()))
    return (MINIMAL.format(name=name) + "expectations:\n  declared:\n    - type: expect_column_values_to_be_in_set\n"
            f"      kwargs: {{column: y, {kwargs}, value_set: *a8}}\n")


@pytest.fixture(params=yaml_reader._LOADERS, ids=lambda cls: cls.__name__)
def each_loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bounds with libyaml's parser (used when PyYAML has it) and with the pure-Python one."""
    monkeypatch.setattr(yaml_reader, "_LOADERS", [request.param])


@pytest.mark.usefixtures("each_loader")
@pytest.mark.timeout(30)  # today's code: minutes and gigabytes; the pytest-timeout fails the test instead
@pytest.mark.parametrize("content", [bomb_in_tags(), bomb_in_kwargs()], ids=["invalid-spec", "valid-spec"])
def test_alias_bomb_is_refused_quickly_naming_file_and_limit(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(content)
    assert len(content) < 2048  # a 2 KB file
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_spec(path)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert str(path) in message
    assert "max_nodes" in message and "alias" in message
    assert elapsed < SPEC_LIMITS.parse_budget_s  # refused by counting, long before the time budget


@pytest.mark.usefixtures("each_loader")
def test_aliases_used_sensibly_still_work(tmp_path: Path) -> None:
    """Anchors and merge keys are ordinary YAML: a spec that reuses a block a few times is fine."""
    path = tmp_path / "p.yaml"
    path.write_text(MINIMAL.format(name="p") + "cleaning:\n  default_numeric: &policy {missing: median}\n"
                    "  columns: {a: *policy, b: {<<: *policy, outliers: clip_iqr}}\n")
    spec = load_spec(path)
    assert spec.cleaning.columns["b"].missing == "median" and spec.cleaning.columns["b"].outliers == "clip_iqr"


@pytest.mark.usefixtures("each_loader")
def test_deep_nesting_is_refused_naming_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    depth = 5000  # deeper than Python's recursion limit: an unbounded composer crashes with RecursionError
    path.write_text(MINIMAL.format(name="deep") + "tags: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and "max_depth" in str(info.value)


@pytest.mark.usefixtures("each_loader")
def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(MINIMAL.format(name="loop") + "tags: &t [x, *t]\n")
    with pytest.raises(SpecError, match=r"(?s)loop\.yaml.*refers to itself"):
        load_spec(path)


def test_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(MINIMAL.format(name="big") + "description: |\n" + ("  " + "x" * 99 + "\n") *
                    (SPEC_LIMITS.max_bytes // 100 + 1))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert str(path) in message and "max_bytes" in message and str(SPEC_LIMITS.max_bytes) in message


@pytest.mark.timeout(20)  # today's code waits for a writer forever
def test_a_huge_integer_literal_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """Python refuses to convert a 5,000-digit literal with a ValueError that YAML does not wrap."""
    path = tmp_path / "digits.yaml"
    path.write_text(MINIMAL.format(name="digits") + "training: {seed: " + "9" * 5000 + "}\n")
    with pytest.raises(SpecError, match=r"(?s)digits\.yaml.*not valid YAML"):
        load_spec(path)


def test_a_fifo_named_like_a_spec_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.yaml")  # reading it would wait forever for a writer
    (tmp_path / "ok.yaml").write_text(MINIMAL.format(name="ok"))
    valid, errors = load_specs(tmp_path)
    assert [s.name for _, s in valid] == ["ok"]
    assert [Path(e.source).name for e in errors] == ["pipe.yaml"]
    assert "not a regular file" in str(errors[0])


def test_each_spec_has_its_own_time_budget(tmp_path: Path) -> None:
    """A spec that runs out of its budget is an error naming it and the limit; it does not count against the
    other files' budgets (each is reported on its own)."""
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(MINIMAL.format(name=name))
    valid, errors = load_specs(tmp_path, limits=SpecLimits(parse_budget_s=0.0))
    assert valid == []
    assert [Path(e.source).name for e in errors] == ["a.yaml", "b.yaml"]
    assert all("parse_budget_s" in str(e) for e in errors)
    valid, errors = load_specs(tmp_path)
    assert sorted(s.name for _, s in valid) == ["a", "b"] and errors == []


@pytest.mark.timeout(60)
def test_a_bomb_never_hides_the_valid_specs(tmp_path: Path) -> None:
    (tmp_path / "a_bomb.yaml").write_text(bomb_in_kwargs("a_bomb"))
    (tmp_path / "b_bomb.yaml").write_text(bomb_in_tags("b_bomb"))
    (tmp_path / "good.yaml").write_text(MINIMAL.format(name="good"))
    valid, errors = load_specs(tmp_path)
    assert [s.name for _, s in valid] == ["good"]
    assert [Path(e.source).name for e in errors] == ["a_bomb.yaml", "b_bomb.yaml"]


def test_limits_are_declared_once_and_typed() -> None:
    assert SPEC_LIMITS.max_bytes > 10_000 and SPEC_LIMITS.max_depth >= 16 and SPEC_LIMITS.max_nodes >= 10_000
    with pytest.raises(ValueError, match="max_nodes"):
        SpecLimits(max_nodes=0)
    # The shipped specs are far inside every limit.
    for path in (Path(__file__).resolve().parents[2] / "dags" / "pipelines").glob("*.yaml"):
        assert path.stat().st_size < SPEC_LIMITS.max_bytes // 10
        assert yaml.safe_load(path.read_text())["name"] == load_spec(path).name
