"""Unit tests for the data profile: streamed statistics, the comparison with the last accepted profile (each way
real data goes wrong names the column and both figures), its JSON form, and the accepted snapshot record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kiln.tasks.features import profile as profile_module
from kiln.tasks.features.profile import DataProfile, compare, profile_parquet
from kiln.tasks.spec.data import ProfileBoundsSpec

BOUNDS = ProfileBoundsSpec()


def penguins(rows: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "bill_length_mm": rng.normal(44, 5, rows).round(1),
        "body_mass_g": rng.normal(4200, 800, rows).round(0),
        "island": rng.choice(["Biscoe", "Dream", "Torgersen"], rows),
        "sex": rng.choice(["male", "female"], rows),
        "species": rng.choice(["Adelie", "Gentoo", "Chinstrap"], rows),
    })


def profiled(tmp_path: Path, df: pd.DataFrame, name: str, reference: DataProfile | None = None) -> DataProfile:
    path = tmp_path / f"{name}.parquet"
    df.to_parquet(path, index=False)
    return profile_parquet(path, reference=reference, range_margin=BOUNDS.range_margin)


@pytest.fixture
def accepted(tmp_path: Path) -> DataProfile:
    return profiled(tmp_path, penguins(), "accepted")


def test_a_profile_holds_types_missing_shares_quantiles_and_categories(tmp_path: Path) -> None:
    df = penguins()
    df.loc[:39, "bill_length_mm"] = np.nan
    p = profiled(tmp_path, df, "p")
    bill, island = p.columns["bill_length_mm"], p.columns["island"]
    assert p.rows == 400 and list(p.columns) == list(df.columns)
    assert (bill.kind, bill.missing, bill.numeric_share) == ("numeric", 40, 1.0)
    assert p.missing_share("bill_length_mm") == pytest.approx(0.1)
    present = df["bill_length_mm"].dropna()
    assert (bill.min, bill.max) == (present.min(), present.max())
    assert bill.quantiles["0.5"] == pytest.approx(present.median())  # exact below the reservoir's size
    assert bill.mean == pytest.approx(present.mean()) and bill.std == pytest.approx(present.std(ddof=0))
    assert island.kind == "categorical" and island.complete and island.other == 0
    assert island.categories == df["island"].value_counts().to_dict()


@pytest.mark.parametrize(("damage", "needles"), [
    pytest.param(lambda df: df.assign(bill_length_mm=df["bill_length_mm"].where(df.index % 20 == 0)),
                 ["column 'bill_length_mm': missing share 0.95, was 0.00 (bound: rise <= 0.20, "
                  "expectations.profile.max_missing_increase)"], id="0-to-95-percent-missing"),
    pytest.param(lambda df: df.assign(body_mass_g=[("n/a" if i % 3 == 0 else str(v))
                                                   for i, v in enumerate(df["body_mass_g"])]),
                 ["column 'body_mass_g': 0.33 of present values are not numbers (e.g. 'n/a'), was 0.00 (bound: "
                  "<= 0.01, expectations.profile.max_type_change_share)"], id="numbers-turned-text-for-a-third"),
    pytest.param(lambda df: df.assign(island=df["island"].map({"Biscoe": "biscoe", "Dream": "DREAM",
                                                               "Torgersen": "Torgersen"})),
                 ["column 'island': 0.6", "of present values are new (e.g. ", "'biscoe'", "'DREAM'",
                  "was 0.00: the previous snapshot had 3 values, 'Biscoe', 'Dream', 'Torgersen' (bound: <= 0.05, "
                  "expectations.profile.max_new_category_share)"], id="category-set-changed"),
    pytest.param(lambda df: df.head(40), ["rows: 40, was 400 (ratio 0.10; bound: >= 0.50, "
                                          "expectations.profile.min_row_ratio)"], id="row-count-collapsed"),
    pytest.param(lambda df: df.assign(body_mass_g=df["body_mass_g"] * 1000),
                 ["column 'body_mass_g': 1.00 of values outside the seen range, now ", ", was ", "(allowed: [",
                  "] with range_margin 0.5; bound: <= 0.05, expectations.profile.max_out_of_range_share)"],
                 id="grams-became-milligrams"),
    pytest.param(lambda df: df.drop(columns="sex"), ["column 'sex': not in the snapshot, was in the previous one",
                                                     "expectations.profile.enabled: false"], id="column-disappeared"),
])
def test_each_damage_is_one_breach_naming_the_column_and_both_figures(tmp_path: Path, accepted: DataProfile,
                                                                       damage, needles: list[str]) -> None:
    current = profiled(tmp_path, damage(penguins(seed=1)), "current", reference=accepted)
    breaches = compare(accepted, current, BOUNDS)
    assert len(breaches) == 1, [str(b) for b in breaches]
    for needle in needles:
        assert needle in str(breaches[0])
    assert breaches[0].field.startswith("expectations.profile.")
    assert json.loads(json.dumps(breaches[0].to_dict()))["message"] == str(breaches[0])


def test_a_new_sample_of_the_same_data_passes(tmp_path: Path, accepted: DataProfile) -> None:
    for seed in (1, 2, 3):
        current = profiled(tmp_path, penguins(rows=300, seed=seed), f"s{seed}", reference=accepted)
        assert compare(accepted, current, BOUNDS) == []


def test_without_counts_against_the_reference_the_shares_are_estimated(tmp_path: Path, accepted: DataProfile) -> None:
    """A profile taken on its own (Monitoring's case) is still compared: from its quantiles and category counts."""
    shifted = penguins(seed=1)
    shifted["body_mass_g"] += 6000  # far past the seen range, but only in its upper half
    shifted.loc[:99, "island"] = "Atlantis"
    current = profiled(tmp_path, shifted, "alone")
    assert current.reference is None
    breaches = {b.column: b for b in compare(accepted, current, BOUNDS)}
    assert set(breaches) == {"body_mass_g", "island"}
    assert "estimated from the quantiles" in str(breaches["body_mass_g"]) and breaches["body_mass_g"].value > 0.5
    assert breaches["island"].value == pytest.approx(0.25)


def test_bounds_ignored_columns_and_allowed_new_classes_are_honoured(tmp_path: Path, accepted: DataProfile) -> None:
    df = penguins(seed=1)
    df.loc[:99, "species"] = "Macaroni"
    df["island"] = None
    current = profiled(tmp_path, df, "c", reference=accepted)
    assert {b.column for b in compare(accepted, current, BOUNDS)} == {"species", "island"}
    assert compare(accepted, current, BOUNDS, ignore=["island"], allow_new_categories=["species"]) == []
    lenient = ProfileBoundsSpec(max_new_category_share=0.3, max_missing_increase=1.0)
    assert compare(accepted, current, lenient) == []


def test_the_row_count_is_compared_per_source_row(tmp_path: Path, accepted: DataProfile) -> None:
    """A run that samples a quarter of the same source has not lost three quarters of its rows."""
    path = tmp_path / "sampled.parquet"
    penguins(rows=100, seed=1).to_parquet(path, index=False)
    sampled = profile_parquet(path, reference=accepted, sample_fraction=0.25)
    assert compare(accepted, sampled, BOUNDS) == []
    unsampled = profile_parquet(path, reference=accepted)
    assert [b.check for b in compare(accepted, unsampled, BOUNDS)] == ["rows"]
    assert compare(accepted, unsampled, BOUNDS, rows=False) == []  # incremental new_only: a batch of new rows


def test_profiles_round_trip_through_json_and_stay_small(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    df = penguins(rows=30_000)
    df["id"] = [f"customer-{i}-{'x' * 300}" for i in range(len(df))]  # free text: every value distinct and long
    df["flag"] = rng.choice([True, False], len(df))
    df["when"] = pd.Timestamp("2026-01-01") + pd.to_timedelta(np.arange(len(df)), unit="min")
    p = profiled(tmp_path, df, "wide")
    text = json.dumps(p.to_dict())
    assert DataProfile.from_dict(json.loads(text)) == p
    assert len(text) < 200_000
    ids = p.columns["id"]
    assert len(ids.categories) == 1000 and not ids.complete and ids.other == 29_000
    assert max(len(v) for v in ids.categories) == 100
    assert p.columns["flag"].kind == "categorical" and set(p.columns["flag"].categories) == {"true", "false"}
    assert p.columns["when"].kind == "other"
    with pytest.raises(ValueError, match="not a data profile"):
        DataProfile.from_dict({"columns": {}})


def test_batches_and_the_reservoir_give_the_same_profile_for_the_same_file(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    values = rng.exponential(10, 60_000)
    path = tmp_path / "big.parquet"
    pd.DataFrame({"x": values}).to_parquet(path, index=False)
    monkeypatch.setattr(profile_module, "BATCH_ROWS", 7_000)
    first, second = profile_parquet(path), profile_parquet(path)
    assert first == second
    x = first.columns["x"]
    assert (x.min, x.max) == (values.min(), values.max())
    for q in ("0.1", "0.5", "0.9"):  # a 10,000-value reservoir of 60,000 values: about 1 % rank error
        rank = (values <= x.quantiles[q]).mean()
        assert rank == pytest.approx(float(q), abs=0.02)


def test_the_accepted_record_is_published_and_read_back(tmp_path: Path) -> None:
    import yaml

    from kiln.tasks.pipeline.accepted import publish_accepted, read_accepted
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.storage.artifacts import LocalArtifactStore

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"name": "tiny", "source": {"uri": "data.csv"},
                                                        "target": "species", "task": "classification"}))
    store = LocalArtifactStore(tmp_path / "store")
    ctx = make_context(tmp_path / "tiny.yaml", "manual__1", store=store)
    assert read_accepted(store, "tiny") is None
    p = profiled(tmp_path, penguins(), "p")
    publish_accepted(ctx, {"rows": 400, "sha256": "ab" * 32}, p)
    got = read_accepted(store, "tiny")
    assert got is not None and got.run_key == "tiny/manual__1" and got.manifest["rows"] == 400
    assert DataProfile.from_dict(got.profile) == p and got.accepted_at
    (store.path("tiny/_accepted") / "profile.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"accepted snapshot record .*_accepted is damaged.*delete that folder"):
        read_accepted(store, "tiny")
