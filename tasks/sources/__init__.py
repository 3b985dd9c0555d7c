"""Where a pipeline's raw data comes from: listing a source's parts (:mod:`.listing`), reading files, S3 objects
and SQL queries as record batches, and streaming them into the Parquet snapshot that ``ingest`` publishes.

Nothing here imports Airflow; a SQL source's connection is resolved by the caller (``RunContext.connection_url``).
"""

from kiln.tasks.sources.errors import IngestError, SourceReadError
from kiln.tasks.sources.listing import SourceListing, SourcePart, list_source

__all__ = ["IngestError", "SourceListing", "SourcePart", "SourceReadError", "list_source"]
