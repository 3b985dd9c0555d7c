"""The champion alias against its recorded history, on a real MLflow registry (SQLite in a temporary folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.tasks.tracking.registry import (
    CHAMPION,
    HISTORY_TAG,
    ChampionMismatchError,
    ChampionMovedError,
    Registry,
)


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    registry.client.create_registered_model("m")
    for _ in range(3):
        registry.client.create_model_version("m", source=(tmp_path / "bundle").as_uri())
    return registry


def test_a_move_is_a_compare_and_set(reg: Registry) -> None:
    assert reg.set_champion("m", "1", action="gate", reason="first", expected=None) is None
    with pytest.raises(ChampionMovedError, match="version 1, not version none"):
        reg.set_champion("m", "2", action="gate", reason="judged against nothing", expected=None)
    assert reg.set_champion("m", "2", action="gate", reason="beat 1", expected="1").version == "1"
    assert [(h["previous"], h["version"]) for h in reg.history("m")] == [(None, "1"), ("1", "2")]


def test_an_alias_moved_outside_kiln_is_refused_until_approved(reg: Registry) -> None:
    reg.set_champion("m", "1", action="gate", reason="first")
    reg.client.set_registered_model_alias("m", CHAMPION, "3")  # a raw MLflow call
    with pytest.raises(ChampionMismatchError, match="names version 3, but .* set version 1"):
        reg.champion("m")
    with pytest.raises(ChampionMismatchError):
        reg.set_champion("m", "2", action="gate", reason="a gate's pass")
    with pytest.raises(ChampionMismatchError):
        reg.rollback_target("m")
    assert reg.champion("m", verified=False).version == "3"
    reg.set_champion("m", "1", action="approve", reason="undo the raw move")  # a person repairs it
    assert reg.champion("m").version == "1"
    assert reg.history("m")[-1]["previous"] == "3"  # the raw move is on the record now


def test_a_deleted_alias_is_refused_too(reg: Registry) -> None:
    reg.set_champion("m", "1", action="gate", reason="first")
    reg.client.delete_registered_model_alias("m", CHAMPION)  # else any candidate would pass as a "first model"
    with pytest.raises(ChampionMismatchError, match="names no version"):
        reg.champion("m")


def test_a_move_cut_short_is_finished_by_its_retry(reg: Registry) -> None:
    reg.set_champion("m", "1", action="gate", reason="first")
    # The history was written, the alias not (the writer was killed in between).
    history = [*reg.history("m"), {"version": "2", "previous": "1", "action": "gate", "reason": "beat 1",
                                   "actor": "run-2", "at": "2026-12-06T00:00:00Z"}]
    reg.client.set_registered_model_tag("m", HISTORY_TAG, json.dumps(history))
    with pytest.raises(ChampionMismatchError):
        reg.champion("m")
    assert reg.set_champion("m", "2", action="gate", reason="beat 1", actor="run-2").version == "1"
    assert reg.champion("m").version == "2" and len(reg.history("m")) == 2


def test_list_shows_aliases(reg: Registry) -> None:
    reg.set_champion("m", "2", action="gate", reason="first")
    reg.client.set_registered_model_alias("m", "staging", "3")
    assert {v.version: v.aliases for v in reg.versions("m")} == {"1": (), "2": ("champion",), "3": ("staging",)}
