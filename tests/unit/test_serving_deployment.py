"""The deployment file (what a model server serves), the serving token, and the micro-batcher, without a server."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import replace

import numpy as np
import pytest

from kiln.tasks.serving.auth import resolve_token, token_path
from kiln.tasks.serving.batching import MicroBatcher
from kiln.tasks.serving.deployment import (
    Canary,
    Deployment,
    DeploymentError,
    ModelRef,
    drop_canary,
    promote_canary,
    read_deployment,
    with_canary,
    with_champion,
    write_deployment,
)
from kiln.tasks.serving.tokens import KILN_GRANT, TokenCheck
from kiln.tasks.settings import get_settings

V3 = ModelRef("3", "/bundles/v3")
V4 = ModelRef("4", "/bundles/v4")


def deployment(**changes) -> Deployment:
    return replace(Deployment("penguins_species", V3, None, "2026-11-23T10:00:00Z"), **changes)


def test_a_deployment_survives_a_round_trip_through_its_file(tmp_path):
    dep = deployment(canary=Canary("4", "/bundles/v4", 0.2))
    path = write_deployment(tmp_path / "serving" / "deployment.json", dep)

    assert read_deployment(path) == dep
    assert json.loads(path.read_text()) == {
        "model": "penguins_species", "champion": {"version": "3", "bundle": "/bundles/v3"},
        "canary": {"version": "4", "bundle": "/bundles/v4", "share": 0.2}, "capture": {"share": 0.1},
        "updated_at": "2026-11-23T10:00:00Z"}
    assert [p.name for p in path.parent.iterdir()] == ["deployment.json"]  # no temporary file left behind


def test_the_helpers_add_promote_and_drop_a_canary():
    dep = deployment()
    with_4 = with_canary(dep, V4, 0.25)
    assert with_4.canary == Canary("4", "/bundles/v4", 0.25) and with_4.champion == V3
    assert with_4.updated_at != dep.updated_at

    promoted = promote_canary(with_4)
    assert promoted.champion == V4 and promoted.canary is None

    assert drop_canary(with_4) == replace(with_4, canary=None, updated_at=drop_canary(with_4).updated_at)
    assert with_champion(with_4, V4).champion == V4 and with_champion(with_4, V4).canary == with_4.canary
    with pytest.raises(ValueError, match="no canary to promote"):
        promote_canary(dep)


@pytest.mark.parametrize(("share", "ok"), [(0.5, True), (1, True), (0, False), (1.5, False), (float("nan"), False),
                                           (True, False), ("0.2", False)],
                         ids=["half", "all", "zero", "above_one", "nan", "bool", "string"])
def test_canary_share_must_be_in_zero_to_one(share, ok):
    if ok:
        assert Canary("4", "/b", share).share == share
    else:
        with pytest.raises(ValueError, match=r"canary.share must be a number in \(0, 1\]"):
            Canary("4", "/b", share)


@pytest.mark.parametrize(("content", "match"), [
    ("{not json", "is not valid JSON"),
    ("[]", "must be a JSON object"),
    ('{"champion": {"version": "3", "bundle": "/b"}}', "'model' is missing"),
    ('{"model": "m", "champion": {"version": "3"}}', "champion must be an object with exactly"),
    ('{"model": "m", "champion": {"version": "", "bundle": "/b"}}', "version must be a non-empty string"),
    ('{"model": "m", "champion": {"version": 3, "bundle": "/b"}}', "version must be a non-empty string"),
    ('{"model": "m", "champion": {"version": "3", "bundle": "/b"}, "canary": {"version": "4", "bundle": "/c"}}',
     "canary must be null or an object"),
    ('{"model": "m", "champion": {"version": "3", "bundle": "/b"}, '
     '"canary": {"version": "4", "bundle": "/c", "share": 2}}', "canary.share"),
], ids=["not_json", "not_object", "no_model", "champion_without_bundle", "empty_version", "int_version",
        "canary_without_share", "share_too_big"])
def test_an_invalid_deployment_file_is_refused_naming_file_and_field(tmp_path, content, match):
    path = tmp_path / "deployment.json"
    path.write_text(content)

    with pytest.raises(DeploymentError, match=match) as info:
        read_deployment(path)
    assert str(path) in str(info.value)


def test_a_missing_deployment_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="deployment.json does not exist") as info:
        read_deployment(tmp_path / "deployment.json")
    assert isinstance(info.value, DeploymentError)


def test_the_token_comes_from_the_setting_else_from_a_private_generated_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_SERVING_DIR", str(tmp_path / "serving"))
    monkeypatch.setenv("KILN_SERVE_TOKEN", "from-the-environment")
    assert resolve_token(get_settings()) == "from-the-environment"
    assert not token_path(get_settings()).exists()

    monkeypatch.delenv("KILN_SERVE_TOKEN")
    settings = get_settings()
    first = resolve_token(settings)
    assert len(first) >= 32 and resolve_token(settings) == first  # generated once, then reused
    assert stat.S_IMODE(os.stat(token_path(settings)).st_mode) == 0o600


def test_the_kiln_token_is_accepted_only_exactly():
    check = TokenCheck("s3cret")

    assert check.grant([(b"host", b"x"), (b"authorization", b"Bearer s3cret")]) is KILN_GRANT
    assert check.grant([(b"authorization", b"Bearer s3cre")]) is None
    assert check.grant([(b"authorization", b"Basic s3cret")]) is None
    assert check.grant([]) is None


def run(coro):
    return asyncio.run(coro)


def test_requests_queued_together_share_one_forward_pass_and_get_their_own_rows():
    calls: list[int] = []

    def double(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x[:, 0] * 2

    async def scenario():
        batcher = MicroBatcher(double, max_batch=8)
        futures = [batcher.submit(np.full((n, 1), float(i), np.float32)) for i, n in enumerate([1, 3, 2])]
        return [await f for f in futures]

    results = run(scenario())

    assert calls == [6]  # one pass for the three requests
    assert [r.tolist() for r in results] == [[0.0], [2.0, 2.0, 2.0], [4.0, 4.0]]


def test_a_batch_holds_at_most_max_batch_rows_and_the_rest_follows():
    calls: list[int] = []

    def identity(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x[:, 0]

    async def scenario():
        batcher = MicroBatcher(identity, max_batch=4)
        futures = [batcher.submit(np.ones((n, 1), np.float32)) for n in (1, 1, 2, 3, 4)]
        await asyncio.gather(*futures)
        return batcher.pending_rows

    assert run(scenario()) == 0
    assert calls == [4, 3, 4]  # in arrival order, as many whole requests as fit


def test_a_failing_forward_pass_fails_every_request_of_its_batch():
    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")

    async def scenario():
        batcher = MicroBatcher(broken, max_batch=8)
        futures = [batcher.submit(np.ones((1, 1), np.float32)) for _ in range(2)]
        return await asyncio.gather(*futures, return_exceptions=True)

    assert [str(e) for e in run(scenario())] == ["boom", "boom"]


def test_a_request_larger_than_max_batch_is_refused():
    async def scenario():
        MicroBatcher(lambda x: x, max_batch=2).submit(np.ones((3, 1), np.float32))

    with pytest.raises(ValueError, match="1 to 2 rows, found 3"):
        run(scenario())


def test_with_a_wait_requests_arriving_within_it_share_a_pass():
    calls: list[int] = []

    def identity(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x[:, 0]

    async def scenario():
        batcher = MicroBatcher(identity, max_batch=8, max_wait_s=0.05)
        first = batcher.submit(np.ones((1, 1), np.float32))
        await asyncio.sleep(0)  # the loop runs once: a zero-wait batcher would have flushed here
        second = batcher.submit(np.ones((2, 1), np.float32))
        await asyncio.gather(first, second)

    run(scenario())
    assert calls == [3]
