"""The step cache with the S3 artifact store (moto's server on loopback): a hit publishes the earlier run's output
again as this run's committed version (fetched, then uploaded; S3 has no links), and the steps do not run."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from cache_fixtures import DATA_STEPS, Counted, run_data_steps
from s3_server import S3Endpoint, s3_endpoint  # noqa: F401

from kiln.tasks.storage.artifacts import file_sha256
from kiln.tasks.storage.s3 import S3ArtifactStore

pytestmark = [pytest.mark.integration, pytest.mark.s3]



def test_hit_on_s3_publishes_the_earlier_output_under_this_run(s3_endpoint: S3Endpoint,  # noqa: F811
                                                                tmp_path: Path) -> None:
    bucket = f"kiln-{uuid.uuid4().hex[:10]}"
    s3_endpoint.client(direct=True).create_bucket(Bucket=bucket)
    store = S3ArtifactStore(f"s3://{bucket}/kiln", cache_dir=tmp_path / "cache", endpoint_url=s3_endpoint.url)
    rng = np.random.default_rng(0)
    pd.DataFrame({"x": rng.normal(size=80).round(3), "y": rng.choice(["p", "q"], size=80)}).to_csv(
        tmp_path / "data.csv", index=False)
    spec = tmp_path / "s3cache.yaml"
    spec.write_text(yaml.safe_dump({"name": "s3cache", "source": {"uri": "data.csv"}, "target": "y",
                                    "task": "classification"}))
    counted = Counted()

    def run(run_id: str) -> dict[str, dict[str, Any]]:
        return run_data_steps(spec, run_id, store, counted, epochs=1 if run_id.endswith("1") else 2)

    first = run("manual__1")
    second = run("manual__2")
    assert counted.calls == list(DATA_STEPS)
    for name in DATA_STEPS:
        assert second[name]["cache"] == first[name]["cache"].replace("miss: ", "hit: ") + " from run manual__1"
        assert store.exists(f"s3cache/manual__2/{name}")
    # A fresh cache folder: this run's version is read back from the bucket, byte for byte the earlier run's.
    fresh = S3ArtifactStore(f"s3://{bucket}/kiln", cache_dir=tmp_path / "fresh", endpoint_url=s3_endpoint.url)
    old, new = fresh.path("s3cache/manual__1/clean"), fresh.path("s3cache/manual__2/clean")
    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())
    assert all(file_sha256(p) == file_sha256(new / p.name) for p in old.iterdir())
