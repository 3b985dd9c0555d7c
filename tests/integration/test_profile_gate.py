"""The profile check in real runs: a first run is accepted, trained, deployed and served as champion; then the
same source damaged in each way the declared expectations let through stops the next run at ``validate``, naming
the column and both figures, while the champion alias, the served endpoint and the accepted snapshot stay as they
were.

The pipelines run in this process (``run_all``: the same step functions the DAG's tasks call) under a pipeline
name and on a serving port of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
import yaml

from kiln.tasks.pipeline import keys
from kiln.tasks.steps.validate import DataValidationError

pytestmark = pytest.mark.integration

NAME = "clinic"
FAST = {"epochs": 3, "nproc": 1}


def visits(rows: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age, dose = rng.normal(50, 12, rows).round(1), rng.normal(5, 1.5, rows).round(2)
    ward = rng.choice(["north", "south", "east"], rows)
    outcome = np.where((age - 50) / 12 + (dose - 5) / 1.5 > 0, "readmitted", "home")
    return pd.DataFrame({"age": age, "dose_mg": dose, "ward": ward, "outcome": outcome})


def write_source(folder: Path, df: pd.DataFrame, port: int) -> Path:
    """The pipeline's CSV (replaced by each damaged copy) and its spec."""
    df.to_csv(folder / f"{NAME}.csv", index=False)
    spec = folder / f"{NAME}.yaml"
    spec.write_text(yaml.safe_dump({"name": NAME, "source": {"uri": f"{NAME}.csv"}, "target": "outcome",
                                    "task": "classification", "deployment": {"port": port}}))
    return spec


class Served(NamedTuple):
    folder: Path
    port: int
    version: str
    """The champion the first run served."""
    accepted_run: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from conftest import free_port

    from kiln.tasks.pipeline.accepted import read_accepted
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.pipeline.runner import run_all
    from kiln.tasks.serving.process import stop_server

    folder, port = tmp_path_factory.mktemp("clinic"), free_port()
    ctx = make_context(write_source(folder, visits(), port), "first", FAST)
    try:
        first = run_all(ctx)
        assert first[keys.PROMOTE].champion == first[keys.REGISTER].version, first.to_dict()
        accepted = read_accepted(ctx.store, NAME)
        assert accepted is not None and accepted.run_key == ctx.run_key
        assert accepted.profile["columns"]["age"]["missing"] == 0
        yield Served(folder, port, first[keys.REGISTER].version, ctx.run_key)
    finally:
        stop_server(Endpoint.of(ctx.spec).run_dir)


def _third_as_text(df: pd.DataFrame) -> pd.DataFrame:
    dose = df["dose_mg"].astype(str)
    dose[df.index % 3 == 0] = "see chart"
    return df.assign(dose_mg=dose)


DAMAGES: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], str]] = {
    "0-to-95-percent-missing": (lambda df: df.assign(age=df["age"].where(df.index % 20 == 0)),
                                "column 'age': missing share 0.95, was 0.00 (bound: rise <= 0.20, "
                                "expectations.profile.max_missing_increase)"),
    "a-third-turned-text": (_third_as_text, "column 'dose_mg': 0.33 of present values are not numbers (e.g. "
                                            "'see chart'), was 0.00 (bound: <= 0.01, "
                                            "expectations.profile.max_type_change_share)"),
    "category-set-changed": (lambda df: df.assign(ward=df["ward"].map({"north": "N", "south": "S", "east": "E"})),
                             "column 'ward': 1.00 of present values are new"),
    "row-count-collapsed": (lambda df: df.head(60), "rows: 60, was 300 (ratio 0.20; bound: >= 0.50, "
                                                    "expectations.profile.min_row_ratio)"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_snapshot_stops_at_validate_and_the_champion_stays_served(served: Served, damage: str) -> None:
    from kiln.tasks.pipeline.accepted import read_accepted
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.pipeline.runner import run_all
    from kiln.tasks.storage.artifacts import read_json
    from kiln.tasks.tracking.registry import Registry

    corrupt, needle = DAMAGES[damage]
    ctx = make_context(write_source(served.folder, corrupt(visits(seed=1)), served.port), f"damaged_{damage}", FAST)
    with pytest.raises(DataValidationError) as raised:
        run_all(ctx)
    message = str(raised.value)
    assert needle in message and f"(run {served.accepted_run};" in message, message
    assert "expectations failed" not in message  # the declared suite let it through: the profile caught it

    run_dir = ctx.store.path(ctx.run_key)
    assert sorted(p.name for p in run_dir.iterdir()) == [keys.INGEST, keys.VALIDATE]
    report = read_json(run_dir / keys.VALIDATE / keys.VALIDATION_FILE)
    assert report["success"] is False and report["profile"]["compared_with"] == served.accepted_run
    assert needle in report["profile"]["breaches"][0]["message"]

    assert Registry.from_settings().champion(NAME).version == served.version
    endpoint = Endpoint.of(ctx.spec)
    current = endpoint.current()
    assert current is not None and current.champion.version == served.version
    with endpoint.client() as client:
        answer: dict[str, Any] = client.predict([{"age": 61.0, "dose_mg": 6.5, "ward": "north"}])
    assert answer["version"] == served.version
    accepted = read_accepted(ctx.store, NAME)
    assert accepted is not None and accepted.run_key == served.accepted_run
