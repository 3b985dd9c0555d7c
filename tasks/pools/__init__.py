"""Resource pools: an inventory of nodes and devices, and leases on them that are granted all or nothing.

Plain Python (SQLAlchemy over SQLite or PostgreSQL); the Airflow side lives in ``operators/pools.py``.
"""
