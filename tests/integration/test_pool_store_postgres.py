"""Every lease-store case of ``tests/unit/test_pool_store.py``, run again on PostgreSQL.

The store takes other code paths there (an autocommit engine, statements prepared per connection and batched
with BEGIN/COMMIT into one round trip, row locks, data-modifying CTEs), so the same behaviour is checked on both
databases. Each case starts from empty tables in the session's PostgreSQL database.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import sqlalchemy as sa

from kiln.tasks.pools.tables import metadata

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

_spec = importlib.util.spec_from_file_location("pool_store_cases", Path(__file__).parents[1] / "unit" /
                                               "test_pool_store.py")
assert _spec is not None and _spec.loader is not None
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)

clock, store = _cases.clock, _cases.store  # fixtures; ``url`` below replaces the SQLite one
globals().update({name: case for name, case in vars(_cases).items()
                  if name.startswith("test_") and name != "test_from_settings_uses_the_configured_file_and_database"})


@pytest.fixture
def url(postgres_url: str) -> str:
    engine = sa.create_engine(postgres_url)
    metadata.drop_all(engine)
    engine.dispose()
    return postgres_url
