"""The champion has one writer: concurrent runs of a pipeline race through gate → deploy → verify → promote.

Real parts, in process: MLflow's registry on SQLite, torchrun training, the model server. The candidates are
trained one after another (the slow part), then released at once from threads: every gate compares with the same
champion before any deploy starts, which is the race of issue 20 (a version gated against version 1 replaced
version 3, promoted seconds earlier). The lock per model held across deploy → verify → promote, and the re-gate
when the champion moved since the gate, must leave the registry and the endpoint on the best gated version, with
every promote naming the champion it beat and the history a chain without a lost update.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"
MODEL = "penguins_species"
RECORD = {"bill_length_mm": 40.0, "bill_depth_mm": 18.0, "flipper_length_mm": 190.0, "body_mass_g": 3800.0,
          "island": "Dream", "sex": "male", "year": "2008"}


def _trained(run_id: str, **params: Any) -> Any:
    """A run's context after ``register``: its candidate is a registered version, not yet gated."""
    from kiln.tasks.pipeline import keys
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.runner import run_all

    ctx = make_context(SPEC, run_id, {"nproc": 1, **params})
    run_all(ctx, until=keys.REGISTER)
    return ctx


def _release(ctx: Any, gated: threading.Barrier) -> dict[str, Any]:
    """gate, then (once every run has gated) infra_validate → deploy → verify → promote; a rejection ends it."""
    from kiln.tasks.pipeline.gate_decision import GateRejectedError
    from kiln.tasks.steps.deploy import deploy
    from kiln.tasks.steps.gate import gate
    from kiln.tasks.steps.infra_validate import infra_validate
    from kiln.tasks.steps.promote import promote
    from kiln.tasks.steps.verify import verify

    out: dict[str, Any] = {"gate": gate(ctx)}
    gated.wait(timeout=600)
    out["t0"] = time.monotonic()
    for name, step in (("infra_validate", infra_validate), ("deploy", deploy), ("verify", verify),
                       ("promote", promote)):
        try:
            out[name] = step(ctx)
        except GateRejectedError as exc:
            out["rejected"] = (name, exc.record)
            break
    out["t1"] = time.monotonic()
    return out


def _race(contexts: list[Any]) -> tuple[list[dict[str, Any]], list[BaseException]]:
    gated = threading.Barrier(len(contexts))
    results: list[dict[str, Any]] = [{} for _ in contexts]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = _release(contexts[i], gated)
        except BaseException as exc:  # noqa: BLE001 (reported by the test, with the run it came from)
            errors.append(exc)
            gated.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(contexts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    return results, errors


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A registry, store, lease store and model server of their own; a first champion is already served."""
    from conftest import free_port, stop_model_servers

    from kiln.tasks.pipeline.runner import run_all

    home = tmp_path_factory.mktemp("writer-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_HOME", str(home))
        mp.setenv("KILN_SERVE_PORT", str(free_port()))
        try:
            base = _trained("base", epochs=2, learning_rate=0.002)  # a weak first champion
            run_all(base)  # gate (first model) → deploy → verify → promote: version 1 is champion and served
            yield home
        finally:
            stop_model_servers(home / "serving")


def _accuracy(record: Any) -> float:
    return float(record.candidate_metrics[record.primary_metric])


def _eligible(record: Any) -> bool:
    """Passes every check but the comparison with a champion (so only a better champion may keep it out)."""
    return all(c["passed"] or c["skipped"] for c in record.checks if c["kind"] != "champion")


def _check_outcome(contexts: list[Any], results: list[dict[str, Any]], errors: list[BaseException],
                   history_before: int) -> dict[str, Any]:
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.pipeline.gate_decision import read_decision
    from kiln.tasks.spec import spec_named
    from kiln.tasks.tracking.registry import Registry

    assert not errors, [f"{type(e).__name__}: {e}" for e in errors]  # no "another deployment file", no lost lock
    reg = Registry.from_settings()
    champion = reg.champion(MODEL)
    endpoint = Endpoint.of(spec_named(MODEL))
    assert endpoint.current().champion.version == champion.version
    with endpoint.client() as client:
        assert client.predict([RECORD])["version"] == champion.version  # the live server, not only the file

    # Every promote names the champion it beat: the one its (final) decision record compared it with, which is
    # the one the registry replaced. The history is a chain: each move starts where the one before ended.
    history = reg.history(MODEL)
    chain = [history[history_before - 1]["version"] if history_before else None,
             *[h["version"] for h in history[history_before:]]]
    assert [h["previous"] for h in history[history_before:]] == chain[:-1], history[history_before:]
    records = {ctx.run_key: read_decision(ctx) for ctx in contexts}
    promoted = [(ctx, out["promote"]) for ctx, out in zip(contexts, results, strict=True) if "promote" in out]
    named = {ctx.run_key: (done.previous, records[ctx.run_key].champion) for ctx, done in promoted}
    assert all(previous == (beat["version"] if beat else None) for previous, beat in named.values()), named
    assert all(done.beat == records[ctx.run_key].champion for ctx, done in promoted)
    for ctx, out in zip(contexts, results, strict=True):
        if "promote" not in out:
            assert not records[ctx.run_key].passed and "rejected" in out, (ctx.run_key, out)
    assert len(chain) - 1 == len(promoted)

    # The best gated version is champion: nothing eligible scored better on the same test rows.
    assert len({r.test_data_hash for r in records.values()}) == 1
    accuracy = {r.champion["version"]: float(r.champion_metrics[r.primary_metric])
                for r in records.values() if r.champion}
    accuracy.update({r.candidate_version: _accuracy(r) for r in records.values()})
    best = max(_accuracy(r) for r in records.values() if _eligible(r))
    assert accuracy[champion.version] >= best, accuracy
    waits = [out["deploy"].lock_wait_s for out in results if "deploy" in out]
    return {"promoted": len(promoted), "regated": sum(bool(r.regated) for r in records.values()),
            "accuracy": {v: round(a, 4) for v, a in sorted(accuracy.items(), key=lambda x: int(x[0]))},
            "lock_waits_s": waits, "release_s": [round(o["t1"] - o["t0"], 1) for o in results]}


MID = {"epochs": 3, "learning_rate": 0.002}  # better than the first champion, likely worse than the others


@pytest.mark.parametrize("candidates", [
    pytest.param(({**MID}, {"epochs": 20}), id="two-runs"),
    pytest.param(({"epochs": 8}, {"epochs": 12}, {"epochs": 20}), id="three-runs"),
])
def test_concurrent_runs_end_on_the_best_gated_version(home: Path, candidates: tuple[dict[str, Any], ...],
                                                       record_property: Any) -> None:
    from kiln.tasks.tracking.registry import Registry

    # One seed for all: the same split, so every candidate is scored on the same test rows.
    n = len(candidates)
    contexts = [_trained(f"race{n}-{i}", **params) for i, params in enumerate(candidates)]
    history_before = len(Registry.from_settings().history(MODEL))
    results, errors = _race(contexts)
    figures = _check_outcome(contexts, results, errors, history_before)
    record_property("figures", figures)
    print(f"\n{n} concurrent runs: {figures}")


def test_a_champion_moved_outside_kiln_is_refused(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Moving ``@champion`` with a raw MLflow call (what an anonymous ``curl`` did) makes the next read refuse."""
    from mlflow import MlflowClient

    from kiln.tasks.cli.main import main
    from kiln.tasks.settings import get_settings
    from kiln.tasks.steps.gate import gate
    from kiln.tasks.tracking.registry import ChampionMismatchError, Registry

    ctx = _trained("after-tamper", epochs=4)
    reg = Registry.from_settings()
    champion = reg.champion(MODEL).version
    other = next(v.version for v in reg.versions(MODEL) if v.version != champion)
    uri = get_settings().mlflow_tracking_uri
    MlflowClient(uri, registry_uri=uri).set_registered_model_alias(MODEL, "champion", other)

    with pytest.raises(ChampionMismatchError) as refused:
        reg.champion(MODEL)
    assert f"version {other}" in str(refused.value) and f"version {champion}" in str(refused.value)
    with pytest.raises(ChampionMismatchError):
        gate(ctx)
    assert main(["models", "rollback", MODEL, "--reason", "try"]) == 2
    err = capsys.readouterr().err
    assert f"version {other}" in err and f"version {champion}" in err
    assert main(["models", "history", MODEL]) == 0
    assert f"WARNING: the champion alias of '{MODEL}' names version {other}" in capsys.readouterr().out

    # An explicit approval is how a person repairs it (recorded in the history like any move).
    assert main(["models", "approve", MODEL, champion, "--reason", "undo the manual alias move"]) == 0
    assert reg.champion(MODEL).version == champion


def test_models_list_shows_the_champion(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.tasks.cli.main import main
    from kiln.tasks.tracking.registry import Registry

    champion = Registry.from_settings().champion(MODEL).version
    capsys.readouterr()
    assert main(["models", "list", MODEL]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[champion] == "champion", rows
    assert all(alias == "-" for version, alias in rows.items() if version != champion), rows
    assert main(["models", "list", MODEL, "--json"]) == 0
    listed = {v["version"]: v["aliases"] for v in __import__("json").loads(capsys.readouterr().out)}
    assert listed[champion] == ["champion"]


def test_the_store_records_what_is_served_and_k8s_names_where_bundles_must_be(
        home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every endpoint change this module's runs made is recorded in the artifact store (what another host serves);
    ``kiln serve k8s`` refuses bundles that pods cannot fetch (a local MLflow artifact store), naming the fix."""
    from kiln.tasks.cli.main import main
    from kiln.tasks.pipeline.context import default_store
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.pipeline.served import read_served
    from kiln.tasks.spec import load_spec

    served = Endpoint.of(load_spec(SPEC)).current()
    assert served is not None
    record = read_served(default_store(), MODEL)
    assert record is not None and record["deployment"] == served.to_dict()

    capsys.readouterr()
    assert main(["serve", "k8s", MODEL, "--image", "registry.example.com/kiln-serve:1"]) == 2
    err = capsys.readouterr().err
    assert "deployment.champion.bundle" in err and "s3://" in err, err
