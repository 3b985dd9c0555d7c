"""The errors a retry cannot fix: the same data (or the same settings) would fail the same way again.

The Airflow operators fail a task at once, without its retries, on any of these; the other errors (a lost
connection, a killed worker, an unreachable store) keep their retries.
"""

from __future__ import annotations


class DataError(ValueError):
    """The data cannot go through the pipeline as it is: the message names what is wrong, and the fix."""
