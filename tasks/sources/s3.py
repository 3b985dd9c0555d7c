"""S3 sources: list an object or a prefix of partition objects, and download a listed object exactly as listed.

The client is the artifact store's (:func:`kiln.tasks.storage.s3.s3_client`: the standard AWS credential chain,
which ``KILN_S3_CONNECTION_ID`` fills from an Airflow connection in a task, and ``KILN_S3_ENDPOINT_URL``). A
download asks for the ETag the listing saw (``GetObject`` with ``IfMatch``), so an object replaced between the
listing and the read fails the run instead of mixing versions: the snapshot holds exactly what the manifest lists.
"""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from kiln.tasks.settings import get_settings
from kiln.tasks.sources.errors import SourceEmptyError, SourceReadError, SourceUnreachableError
from kiln.tasks.sources.listing import SourceListing, SourcePart, partition_format
from kiln.tasks.spec.sources import SourceError, s3_parts
from kiln.tasks.storage.s3 import (
    BAD_CREDENTIAL_CODES,
    DENIED_CODES,
    MISSING_BUCKET_CODES,
    MiB,
    s3_client,
)

if TYPE_CHECKING:
    from kiln.tasks.spec import SourceSpec

log = logging.getLogger(__name__)

#: The most objects a prefix may hold (an unbounded listing is an unbounded manifest).
MAX_PARTS = 100_000
CHUNK = 8 * MiB
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def client() -> Any:
    """The S3 client of sources (the endpoint ``KILN_S3_ENDPOINT_URL``, the standard credential chain)."""
    return s3_client(get_settings().s3_endpoint_url)


def list_s3(uri: str, source: SourceSpec) -> SourceListing:
    """The listing of ``s3://bucket/key`` (one object) or ``s3://bucket/prefix/`` (its partition objects).

    A key without a trailing ``/`` that names no object but has objects under ``key/`` is read as that prefix.

    Raises:
        SourceReadError: a malformed URI, no such bucket, object or prefix, an empty prefix, access denied, missing
            or rejected credentials, more than :data:`MAX_PARTS` objects.
        SourceUnreachableError: the endpoint cannot be reached.
    """
    try:
        bucket, key = s3_parts(uri)
    except SourceError as exc:
        raise SourceReadError(f"source.uri {exc}") from None
    s3 = client()
    if key and not key.endswith("/"):
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _code(exc) not in _NOT_FOUND:
                raise s3_error(exc, uri, "reading") from None
        except BotoCoreError as exc:
            raise s3_error(exc, uri, "reading") from None
        else:
            part = SourcePart(name=posixpath.basename(key), size=int(head["ContentLength"]),
                              etag=str(head["ETag"]).strip('"'))
            return SourceListing(uri=uri, parts=(part,), root=f"s3://{bucket}/{posixpath.dirname(key)}/"
                                 if "/" in key else f"s3://{bucket}/")
        key += "/"
    parts = _list_prefix(s3, bucket, key, uri, source)
    if not parts and not uri.endswith("/") and key != "/":
        raise SourceEmptyError(f"no object s3://{bucket}/{key[:-1]} and no partition object under s3://{bucket}/{key} "
                              f"(source.uri {uri!r}) at {get_settings().s3_endpoint_url or 'AWS S3'}: fix the key "
                              "in source.uri, or upload the data")
    if not parts:
        raise SourceEmptyError(f"no partition object under s3://{bucket}/{key} (source.uri {uri!r}; *.csv, "
                              "*.csv.gz, *.parquet; names starting with '.' or '_' are skipped): fix the prefix, "
                              "upload the data, or set source.format to read objects with other extensions")
    return SourceListing(uri=uri, parts=tuple(sorted(parts, key=lambda p: p.name)), root=f"s3://{bucket}/{key}")


def _list_prefix(s3: Any, bucket: str, prefix: str, uri: str, source: SourceSpec) -> list[SourcePart]:
    parts: list[SourcePart] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix):]
                if not name or name.endswith("/") or partition_format(name, source) is None:
                    continue
                parts.append(SourcePart(name=name, size=int(obj["Size"]), etag=str(obj["ETag"]).strip('"')))
                if len(parts) > MAX_PARTS:
                    raise SourceReadError(f"s3://{bucket}/{prefix} (source.uri {uri!r}) holds more than "
                                          f"{MAX_PARTS} partition objects; point source.uri at a narrower prefix")
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(exc, uri, "listing") from None
    return parts


def download(listing: SourceListing, part: SourcePart, target: Path) -> None:
    """Download ``part`` into ``target``, only if the object still has the ETag the listing saw.

    Raises:
        SourceReadError: the object changed or vanished since it was listed, or cannot be read.
        SourceUnreachableError: the endpoint cannot be reached.
    """
    location = listing.location(part)
    bucket, key = s3_parts(location)
    try:
        # One GET with IfMatch (s3transfer's download_file takes no IfMatch), streamed to disk in blocks.
        body = client().get_object(Bucket=bucket, Key=key, IfMatch=f'"{part.etag}"')["Body"]
        with open(target, "wb") as out:
            for chunk in body.iter_chunks(CHUNK):
                out.write(chunk)
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(exc, location, "downloading") from None
    size = target.stat().st_size
    if size != part.size:
        raise SourceReadError(f"{location} has {size} bytes, the listing said {part.size}: the object changed while "
                              "it was read; run the pipeline again")
    log.info("downloaded %s (%d bytes, ETag %s)", location, size, part.etag)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def s3_error(exc: BaseException, uri: str, action: str) -> SourceReadError | SourceUnreachableError:
    """One message per cause of a failed S3 request, naming the object or prefix and the fix (never a secret)."""
    endpoint = get_settings().s3_endpoint_url or "AWS S3"
    bucket = uri.removeprefix("s3://").partition("/")[0]
    if isinstance(exc, ClientError):
        code = _code(exc)
        if code in MISSING_BUCKET_CODES:
            return SourceReadError(f"bucket {bucket!r} does not exist at {endpoint} (source.uri {uri!r}): fix the "
                                   "bucket name in source.uri, or KILN_S3_ENDPOINT_URL")
        if code in BAD_CREDENTIAL_CODES:
            return SourceReadError(f"{endpoint} rejected the AWS credentials ({code}) while {action} {uri}: fix "
                                   "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or the Airflow connection "
                                   "KILN_S3_CONNECTION_ID names")
        if code in DENIED_CODES:
            return SourceReadError(f"access denied while {action} {uri} at {endpoint}: grant these credentials "
                                   f"s3:ListBucket and s3:GetObject on s3://{bucket}, or use credentials that have "
                                   "them (KILN_S3_CONNECTION_ID)")
        if code in ("PreconditionFailed", "412"):
            return SourceReadError(f"{uri} changed after it was listed (its ETag is no longer the one listed): the "
                                   "source was overwritten during the run; run the pipeline again")
        if code in _NOT_FOUND:
            return SourceReadError(f"{uri} does not exist at {endpoint} (it was deleted after it was listed, or "
                                   "source.uri names no object); fix source.uri or run the pipeline again")
        return SourceReadError(f"S3 error {code} while {action} {uri} at {endpoint}: "
                               f"{exc.response.get('Error', {}).get('Message', '')}")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return SourceReadError(f"no AWS credentials for {uri} at {endpoint}: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or (in Airflow) KILN_S3_CONNECTION_ID to an "
                               "aws connection")
    if isinstance(exc, (EndpointConnectionError, BotoConnectionError, HTTPClientError)):
        return SourceUnreachableError(f"cannot reach the S3 endpoint {endpoint} while {action} {uri}: "
                                      f"{type(exc).__name__}; start it or fix KILN_S3_ENDPOINT_URL")
    return SourceReadError(f"S3 failure while {action} {uri} at {endpoint}: {exc}")
