"""Database connections for SQL sources: an Airflow connection id resolved to a SQLAlchemy URL in the task's process.

``tasks/`` never imports Airflow: :func:`run_context` hands the steps :func:`connection_url` as a resolver, and the
``ingest`` step calls it with ``source.sql.conn_id``. The URL (which holds the password) stays in this process: it
is neither logged nor returned as XCom. Read here rather than through the provider hooks, because kiln needs only
the URL, and the PostgreSQL/MySQL providers would each add a package per database type to every install.
"""

from __future__ import annotations

from airflow.sdk import Connection
from airflow.sdk.exceptions import AirflowNotFoundException

#: Airflow connection types and the SQLAlchemy driver each maps to.
DRIVERS = {"postgres": "postgresql+psycopg2", "postgresql": "postgresql+psycopg2", "mysql": "mysql+pymysql",
           "sqlite": "sqlite", "mssql": "mssql+pymssql"}


class ConnectionLookupError(LookupError):
    """The connection does not exist or is of a type kiln cannot read; the message names it and the fix."""


def connection_url(conn_id: str) -> str:
    """The SQLAlchemy URL of the Airflow connection ``conn_id``.

    Raises:
        ConnectionLookupError: no such connection, or its type has no SQLAlchemy driver here.
    """
    from sqlalchemy.engine import URL

    try:
        conn = Connection.get(conn_id)
    except AirflowNotFoundException:
        raise ConnectionLookupError(
            f"no Airflow connection '{conn_id}': add it (airflow connections add {conn_id} --conn-uri "
            f"postgresql://user:password@host:5432/db, or AIRFLOW_CONN_{conn_id.upper()}) or fix the id") from None
    driver = DRIVERS.get(conn.conn_type or "")
    if driver is None:
        raise ConnectionLookupError(f"Airflow connection '{conn_id}' has type '{conn.conn_type}', which kiln cannot "
                                    f"read as SQL; use one of: {', '.join(sorted(DRIVERS))}")
    if driver == "sqlite":
        return str(URL.create("sqlite", database=conn.host or conn.schema))
    return URL.create(driver, username=conn.login or None, password=conn.password or None, host=conn.host or None,
                      port=conn.port or None, database=conn.schema or None).render_as_string(hide_password=False)
