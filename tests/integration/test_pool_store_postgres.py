"""Every lease-store case of ``tests/unit/test_pool_store.py`` and ``test_pool_preemption.py``, run again on
PostgreSQL.

The store takes other code paths there (an autocommit engine, statements prepared per connection and batched
with BEGIN/COMMIT into one round trip, row locks, data-modifying CTEs), so the same behaviour is checked on both
databases. Each case starts from empty tables in the session's PostgreSQL database.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from kiln.tasks.pools.tables import metadata

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def _load(name: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"pool_cases_{name}", Path(__file__).parents[1] / "unit" /
                                                  f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.setdefault(name, module)  # the preemption cases import the store cases' helpers by this name
    return vars(module)


_cases = _load("test_pool_store")
clock, store = _cases["clock"], _cases["store"]  # fixtures; ``url`` below replaces the SQLite one
for _module in (_cases, _load("test_pool_preemption")):
    globals().update({name: case for name, case in _module.items() if name.startswith("test_")
                      and name != "test_from_settings_uses_the_configured_file_and_database"})


@pytest.fixture
def url(postgres_url: str) -> str:
    engine = sa.create_engine(postgres_url)
    metadata.drop_all(engine)
    engine.dispose()
    return postgres_url
