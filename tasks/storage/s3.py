"""Artifacts in an S3 (or S3-compatible) bucket, behind the same interface as the local store.

Layout under ``s3://bucket/prefix``::

    <prefix>/<key>/.v/<version>/<relpath>   the files of one published version (version = a fresh uuid)
    <prefix>/<key>/_manifest.json           the commit object: {"version", "files": {relpath: {sha256, size}},
                                            "created_at"}

A writer uploads every file under a fresh version prefix and writes the manifest last, with one ``put_object``
(atomic in S3). Readers only ever follow a manifest, so a half-uploaded version is invisible and a failed upload
leaves the previous manifest, the previous good state, in place. One writer per key at a time (steps are
run-keyed): after its commit a writer deletes every other version prefix of its key and aborts the multipart
uploads a killed writer left under them.

Reads download a version once into a local cache, ``<cache_dir>/<bucket>/<prefix>/<key>/<version>/``, verifying
every sha256; caching a key's new version deletes its older cached ones. A writer's staging folder
(``<cache_dir>/.staging/write-*``) and a reader's download (``.tmp-*``) are held with ``flock`` by their process:
the next writer (reader) removes those whose process was killed, never a live one's. Credentials come from the
standard AWS chain (environment variables, profile, instance role; in Airflow tasks, ``KILN_S3_CONNECTION_ID`` puts
a connection's there) and never appear in messages or logs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ConnectionError as S3ConnectionError

from kiln.tasks.storage import publish
from kiln.tasks.storage.artifacts import (
    ArtifactNotFoundError,
    ArtifactStore,
    ArtifactStoreError,
    file_sha256,
    key_parts,
)

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
VERSIONS = ".v"
MiB = 1 << 20
#: Files above 16 MiB go up (and down) as 16 MiB parts, 4 at a time: streaming with about 64 MiB of buffers per
#: transfer whatever the file size; s3transfer raises the part size itself past S3's 10,000-part limit (~160 GB).
TRANSFER = TransferConfig(multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_concurrency=4,
                          use_threads=True)

MISSING_BUCKET_CODES = {"NoSuchBucket"}
BAD_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                        "InvalidClientTokenId", "UnrecognizedClientException", "AuthFailure"}
DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "Forbidden", "403"}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (the prefix may be empty).

    Raises:
        ValueError: not an ``s3://`` URI, or no bucket.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"artifact root {uri!r} is not an s3:// URI: use s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"artifact root {uri!r} names no bucket: use s3://bucket/prefix")
    return bucket, prefix.strip("/")


def s3_client(endpoint_url: str | None, max_attempts: int = 5) -> Any:
    """An S3 client on the standard AWS credential chain, with botocore's ``standard`` retries (exponential
    backoff with jitter on throttling, 5xx answers and connection errors) and bounded connect and read timeouts.

    Args:
        endpoint_url: an S3-compatible endpoint (``KILN_S3_ENDPOINT_URL``); ``None``: AWS.
        max_attempts: attempts per request.
    """
    config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts}, connect_timeout=10,
                    read_timeout=60)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


class S3ArtifactStore(ArtifactStore):
    """Artifacts in ``s3://bucket/prefix``, published by manifest and read through a verified local cache.

    Args:
        uri: ``s3://bucket/prefix``.
        cache_dir: local folder for downloaded versions, writer staging and scratch folders.
        endpoint_url: an S3-compatible endpoint (``KILN_S3_ENDPOINT_URL``); ``None``: AWS.
        max_attempts: attempts per request, botocore's ``standard`` retry mode: exponential backoff with jitter on
            throttling, 5xx answers and connection errors (no retry loop of our own).
        transfer: multipart settings of uploads and downloads (default :data:`TRANSFER`).
    """

    durable_scratch = False  # scratch folders are on the local disk of the machine that asked for them

    def __init__(self, uri: str, *, cache_dir: str | Path, endpoint_url: str | None = None, max_attempts: int = 5,
                 transfer: TransferConfig | None = None):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.cache_dir = Path(cache_dir).resolve()
        self.transfer = transfer or TRANSFER
        self.client = s3_client(endpoint_url, max_attempts)
        self.endpoint = self.client.meta.endpoint_url

    # -- keys ---------------------------------------------------------------------------------------------------

    def _base(self, key: str) -> str:
        return "/".join([*([self.prefix] if self.prefix else []), *key_parts(key)])

    def _local(self, key: str) -> Path:
        return self.cache_dir.joinpath(self.bucket, *self.prefix.split("/"), *key_parts(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._base(key)}"

    # -- public interface ---------------------------------------------------------------------------------------

    @contextmanager
    def writer(self, key: str) -> Iterator[Path]:
        local = self._local(key)
        staging = self.cache_dir / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        for entry in staging.iterdir():  # a killed writer's staged output (a whole step's): no live one holds it
            if entry.name.startswith("write-"):
                publish.remove_abandoned(entry)
        with publish.temp_folder(staging, "write-") as tmp:
            try:
                yield tmp  # an exception in the body propagates from here: nothing is uploaded
                version = self._publish(key, tmp)
                # The staged files are exactly the published version: keep them as its cache entry (no download).
                local.mkdir(parents=True, exist_ok=True)
                _rename_into(tmp, local / version)
                _prune_cache(local, keep=version)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def path(self, key: str) -> Path:
        manifest = self._read_manifest(key)
        if manifest is None:
            raise ArtifactNotFoundError(f"no artifact published under {self.uri(key)}")
        version = manifest["version"]
        final = self._local(key) / version
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with publish.temp_folder(final.parent, f".tmp-{version}-") as tmp:
            try:
                self._download(key, manifest, tmp)
                _rename_into(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _prune_cache(final.parent, keep=version)
        return final

    def exists(self, key: str) -> bool:
        return self._read_manifest(key) is not None

    def children(self, key: str) -> list[str]:
        prefix = f"{self._base(key)}/"
        names: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                         Delimiter="/")
            for page in pages:
                names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        except (ClientError, BotoCoreError) as exc:
            raise self._store_error(exc, f"listing {self.uri(key)}") from exc
        return sorted(n for n in names if n and not n.startswith("."))

    def scratch(self, key: str) -> Path:
        """A persistent folder on THIS machine (``<cache_dir>/.scratch/...``); it is not uploaded to the bucket
        (``kiln.tasks.training.checkpoint_sync`` publishes what a retry elsewhere needs)."""
        path = self.cache_dir.joinpath(".scratch", self.bucket, *self.prefix.split("/"), *key_parts(key))
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- writing ------------------------------------------------------------------------------------------------

    def _publish(self, key: str, folder: Path) -> str:
        """Upload ``folder`` as a new version of ``key`` and commit it with the manifest; returns the version."""
        base, version = self._base(key), uuid.uuid4().hex
        files: dict[str, dict[str, Any]] = {}
        uploaded: list[str] = []
        committing = False
        # The sha256 of every file is computed on a thread of its own while the files upload: a hash pass before
        # each upload cost 12% of a 1 GiB upload's time on loopback (0.8 s of 6.3 s). The manifest, not the
        # object, records the hash, since an object's metadata is fixed when its upload starts.
        paths = sorted(p for p in folder.rglob("*") if p.is_file())
        hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        try:
            digests = [hasher.submit(file_sha256, path) for path in paths]
            for path, digest in zip(paths, digests, strict=True):
                rel = path.relative_to(folder).as_posix()
                size = path.stat().st_size
                obj = f"{base}/{VERSIONS}/{version}/{rel}"
                uploaded.append(obj)
                self.client.upload_file(str(path), self.bucket, obj, Config=self.transfer)
                files[rel] = {"sha256": digest.result(), "size": size}
            manifest = {"version": version, "files": files, "created_at": datetime.now(UTC).isoformat()}
            committing = True
            self.client.put_object(Bucket=self.bucket, Key=f"{base}/{MANIFEST}", ContentType="application/json",
                                   Body=json.dumps(manifest, indent=2).encode())
        except BaseException as exc:
            # A failed manifest write may still have landed, so its files stay; the next commit sweeps them.
            if not committing:
                self._delete_best_effort(uploaded, f"the partial upload of {self.uri(key)} (version {version})")
            if isinstance(exc, (ClientError, BotoCoreError, S3UploadFailedError)):
                raise self._store_error(exc, f"publishing {self.uri(key)}") from exc
            raise
        finally:
            hasher.shutdown(wait=True, cancel_futures=True)  # a failed upload does not hash the files after it
        log.info("published %s: %d files, %.1f MB, version %s", self.uri(key), len(files),
                 sum(f["size"] for f in files.values()) / 1e6, version)
        self._sweep(key, keep=version)
        return version

    def _sweep(self, key: str, keep: str) -> None:
        """Delete every version prefix of ``key`` but ``keep``, and abort the multipart uploads left under them by
        a process killed mid-upload (S3 keeps, and bills, their parts until then). Best effort: a leftover only
        costs storage, and the next commit of the key tries again."""
        versions, kept = f"{self._base(key)}/{VERSIONS}/", f"{self._base(key)}/{VERSIONS}/{keep}/"
        try:
            stale = [obj["Key"] for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=versions) for obj in page.get("Contents", [])
                if not obj["Key"].startswith(kept)]
            uploads = [(u["Key"], u["UploadId"]) for page in self.client.get_paginator(
                "list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=versions)
                for u in page.get("Uploads", []) if not u["Key"].startswith(kept)]
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not list old versions of %s: %s", self.uri(key), self._store_error(exc, "listing"))
            return
        self._delete_best_effort(stale, f"old versions of {self.uri(key)}")
        for obj, upload_id in uploads:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=obj, UploadId=upload_id)
                log.info("aborted an unfinished multipart upload of s3://%s/%s", self.bucket, obj)
            except (ClientError, BotoCoreError) as exc:
                log.warning("could not abort the multipart upload of s3://%s/%s: %s", self.bucket, obj,
                            self._store_error(exc, "aborting an upload"))

    def _delete_best_effort(self, keys: list[str], what: str) -> None:
        try:
            for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": k} for k in keys[i:i + 1000]]
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                for err in answer.get("Errors", []):
                    log.warning("could not delete s3://%s/%s: %s", self.bucket, err.get("Key"), err.get("Code"))
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not delete %s: %s", what, self._store_error(exc, "deleting"))
        else:
            if keys:
                log.info("deleted %s (%d objects)", what, len(keys))

    # -- reading ------------------------------------------------------------------------------------------------

    def _read_manifest(self, key: str) -> dict[str, Any] | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=f"{self._base(key)}/{MANIFEST}")["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._store_error(exc, f"reading the manifest of {self.uri(key)}") from exc
        except BotoCoreError as exc:
            raise self._store_error(exc, f"reading the manifest of {self.uri(key)}") from exc
        return json.loads(body)

    def _download(self, key: str, manifest: dict[str, Any], into: Path) -> None:
        """Download the version ``manifest`` names into ``into``, checking every file's size and sha256."""
        prefix = f"{self._base(key)}/{VERSIONS}/{manifest['version']}"
        for rel, meta in manifest["files"].items():
            target, obj = into / rel, f"{prefix}/{rel}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.client.download_file(self.bucket, obj, str(target), Config=self.transfer)
            except (ClientError, BotoCoreError) as exc:
                raise self._store_error(exc, f"downloading s3://{self.bucket}/{obj}") from exc
            actual = file_sha256(target)
            if actual != meta["sha256"]:
                raise ArtifactStoreError(
                    f"s3://{self.bucket}/{obj} does not match its manifest: sha256 {actual}, expected "
                    f"{meta['sha256']} ({target.stat().st_size} bytes, expected {meta['size']}); the object was "
                    f"changed after publishing: re-run the step that writes {self.uri(key)}")
        log.info("downloaded %s version %s (%d files) into %s", self.uri(key), manifest["version"],
                 len(manifest["files"]), into.parent)

    # -- errors -------------------------------------------------------------------------------------------------

    def _store_error(self, exc: BaseException, action: str) -> ArtifactStoreError:
        """One message per cause, naming the bucket, the endpoint and the fix (never the credentials)."""
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, (ClientError, BotoCoreError)):
            exc = exc.__context__  # boto3 wraps the ClientError of a failed upload in a string
        bucket, endpoint = self.bucket, self.endpoint
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in MISSING_BUCKET_CODES:
                return ArtifactStoreError(f"bucket {bucket!r} does not exist at {endpoint}: create it "
                                          f"(aws s3 mb s3://{bucket}) or fix KILN_ARTIFACT_ROOT")
            if code in BAD_CREDENTIAL_CODES:
                return ArtifactStoreError(f"{endpoint} rejected the AWS credentials ({code}) while {action} in "
                                          f"bucket {bucket!r}: fix AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                                          "AWS_PROFILE")
            if code in DENIED_CODES:
                return ArtifactStoreError(f"access denied to bucket {bucket!r} at {endpoint} while {action}: grant "
                                          "these credentials s3:GetObject, s3:PutObject, s3:DeleteObject and "
                                          f"s3:ListBucket on s3://{bucket}/{self.prefix}, or fix KILN_ARTIFACT_ROOT")
            attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
            return ArtifactStoreError(f"S3 error {code} while {action} in bucket {bucket!r} at {endpoint} (after "
                                      f"{attempts} attempt(s) with backoff): {error.get('Message', '')}")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return ArtifactStoreError(f"no AWS credentials for bucket {bucket!r} at {endpoint}: set "
                                      "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or (in Airflow) "
                                      "KILN_S3_CONNECTION_ID to an aws connection")
        if isinstance(exc, (S3ConnectionError, HTTPClientError)):
            return ArtifactStoreError(f"cannot reach the S3 endpoint {endpoint} (bucket {bucket!r}) while {action}: "
                                      f"{type(exc).__name__}; start it or fix KILN_S3_ENDPOINT_URL")
        return ArtifactStoreError(f"S3 failure while {action} in bucket {bucket!r} at {endpoint}: {exc}")


def _prune_cache(folder: Path, keep: str) -> None:
    """Delete the cached versions of one key other than ``keep``: the manifest no longer names them, so no reader
    is sent there again, and a key rewritten often (checkpoints) would otherwise fill the disk."""
    for entry in folder.iterdir():
        if entry.name.startswith(".tmp-"):
            publish.remove_abandoned(entry)  # a download: kept while its reader is alive
        elif entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)


def _rename_into(tmp: Path, final: Path) -> None:
    """Move a complete folder into place; if another process placed the same version first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
