"""storage_transfer: a 1 GiB file up to and back from S3 through ``S3ArtifactStore``, against boto3's TransferManager.

The S3 endpoint is moto's standalone server on loopback (``tests/s3_server.py``; the store and the peer both talk
to moto directly, not through the test forwarder). One 1 GiB file of cheap pseudo-random bytes (one
``os.urandom`` MiB, its first 8 bytes replaced by the MiB's index) is moved by two sides:

* ours: published through ``S3ArtifactStore.writer`` (the file is hard-linked into the staging folder, as a step
  would have written it there: multipart upload with :data:`kiln.tasks.storage.s3.TRANSFER` while a thread computes
  the sha256, manifest, sweep), then read back by a second store with an empty cache through ``path()`` (manifest,
  download, sha256 check against the manifest).
* peer: ``client.upload_file`` and ``client.download_file`` with no ``Config``: boto3's TransferManager with its
  default ``TransferConfig`` (8 MiB parts, 10 threads), no checksum pass.

Each side runs in its own process, so its peak RSS (``ru_maxrss``) is its own: the parent's and moto's memory do
not count. Throughput is in MB/s (10^6 bytes); combined = 2 x size / (upload s + download s). There are
``--rounds`` rounds (default 2) in alternating order (ours first, then the peer first), and each side's figures are
from its best round by combined time: other jobs on the shared 2-core machine only ever slow a transfer down. The
objects and the downloaded files are deleted after every transfer, so moto never holds more than one copy.

moto serves a ranged GET by reading the whole object (about 0.6 s per GET of a 1 GiB object here, whatever the
range), so at 1 GiB the downloads measure moto more than the clients: download time grows with the number of
parts, and the side with bigger parts (ours: 16 MiB, 64 GETs; the peer: 8 MiB, 128 GETs) downloads faster. Real S3
serves a range in time proportional to the range; read the download figures as a loopback check, not a forecast.

Targets: ours / peer combined throughput >= 0.9 (the JSON line's ``ratio``), and our peak RSS <= 256 MiB (in the
``peer`` text and printed above the JSON line). ``--size-mib`` shrinks the file for a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MiB, MB = 1 << 20, 1_000_000
SIZE_MIB, ROUNDS = 1024, 2
TARGET_RATIO, TARGET_RSS_MIB = 0.9, 256
SIDES = ("ours", "peer")
KEY, BLOB = "bench/transfer", "blob.bin"
CHILD_TIMEOUT_S = 1800


# -- one side, in its own process ---------------------------------------------------------------------------------

def transfer_ours(endpoint: str, bucket: str, source: Path, work: Path) -> tuple[float, float]:
    """Publish ``source`` through a store and read it back through another with an empty cache; returns seconds."""
    from kiln.tasks.storage.s3 import S3ArtifactStore

    uri = f"s3://{bucket}/ours"
    writer = S3ArtifactStore(uri, cache_dir=work / "writer-cache", endpoint_url=endpoint)
    reader = S3ArtifactStore(uri, cache_dir=work / "reader-cache", endpoint_url=endpoint)
    started = time.perf_counter()
    with writer.writer(KEY) as out:
        os.link(source, out / BLOB)
    uploaded = time.perf_counter()
    folder = reader.path(KEY)  # raises if the sha256 of the download does not match the manifest
    downloaded = time.perf_counter()
    if not folder.is_relative_to(work / "reader-cache") or (folder / BLOB).stat().st_size != source.stat().st_size:
        raise RuntimeError(f"ours: {folder / BLOB} is not a full download of {source}")
    return uploaded - started, downloaded - uploaded


def transfer_peer(endpoint: str, bucket: str, source: Path, work: Path) -> tuple[float, float]:
    """``upload_file`` and ``download_file`` with boto3's default TransferConfig; returns seconds."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    target = work / BLOB
    started = time.perf_counter()
    client.upload_file(str(source), bucket, f"peer/{BLOB}")
    uploaded = time.perf_counter()
    client.download_file(bucket, f"peer/{BLOB}", str(target))
    downloaded = time.perf_counter()
    if target.stat().st_size != source.stat().st_size:
        raise RuntimeError(f"peer: {target} is {target.stat().st_size} bytes, {source} {source.stat().st_size}")
    return uploaded - started, downloaded - uploaded


def run_child(args: argparse.Namespace) -> None:
    """Child mode: one side's transfers; prints its seconds and peak RSS as one JSON line."""
    transfer = transfer_ours if args.child == "ours" else transfer_peer
    rss_before = _maxrss_mib()  # the interpreter and imports, before any transfer buffer
    up_s, down_s = transfer(args.endpoint, args.bucket, Path(args.source), Path(args.work))
    print(json.dumps({"upload_s": up_s, "download_s": down_s, "rss_before_mib": rss_before,
                      "peak_rss_mib": _maxrss_mib()}), flush=True)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- the parent: server, source file, rounds ----------------------------------------------------------------------

def write_source(path: Path, size_mib: int) -> Path:
    """``size_mib`` MiB that neither compress nor repeat within a MiB, for the price of one ``os.urandom`` MiB."""
    block = bytearray(os.urandom(MiB))
    with path.open("wb") as fh:
        for i in range(size_mib):
            block[:8] = i.to_bytes(8, "little")
            fh.write(block)
    return path


def measure(side: str, endpoint: str, bucket: str, source: Path, work: Path) -> dict[str, float]:
    """Run one side in a fresh process; returns its seconds, MB/s and peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--endpoint", endpoint, "--bucket", bucket,
           "--source", str(source), "--work", str(work)]
    work.mkdir()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} transfer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    size = source.stat().st_size
    r.update(upload_mbps=size / MB / r["upload_s"], download_mbps=size / MB / r["download_s"],
             combined_mbps=2 * size / MB / (r["upload_s"] + r["download_s"]))
    print(f"{side}: up {r['upload_mbps']:.0f} MB/s ({r['upload_s']:.1f} s), down {r['download_mbps']:.0f} MB/s "
          f"({r['download_s']:.1f} s), combined {r['combined_mbps']:.0f} MB/s, peak RSS {r['peak_rss_mib']:.0f} MiB "
          f"({r['rss_before_mib']:.0f} before the transfers)", flush=True)
    return r


def empty_bucket(client: Any, bucket: str) -> None:
    """Delete every object, so that moto holds one side's copy at a time."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def run_rounds(size_mib: int, rounds: int) -> dict[str, list[dict[str, float]]]:
    """Start moto, write the source file and run the rounds; everything is removed again on the way out."""
    sys.path.insert(0, str(REPO / "tests"))
    import conftest
    from s3_server import AWS_ENV, S3Endpoint

    # Test credentials for moto, inherited by the children; a developer's own AWS profile stays out.
    os.environ.update(AWS_ENV, AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    endpoint = S3Endpoint(moto_port=conftest.free_port(), port=conftest.free_port())
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
    try:
        endpoint.start()
        client, bucket = endpoint.client(direct=True), "kiln-bench"
        client.create_bucket(Bucket=bucket)
        t0 = time.perf_counter()
        source = write_source(tmp / "source.bin", size_mib)
        print(f"wrote {size_mib} MiB in {time.perf_counter() - t0:.1f} s; moto at {endpoint.moto_url}", flush=True)
        for rnd in range(rounds):
            for side in SIDES if rnd % 2 == 0 else SIDES[::-1]:
                work = tmp / f"{side}{rnd}"
                try:
                    results[side].append({"round": rnd + 1, **measure(side, endpoint.moto_url, bucket, source, work)})
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                    empty_bucket(client, bucket)
    finally:
        endpoint.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(conftest._STATE, ignore_errors=True)  # conftest makes a test state folder on import
    return results


# -- report -------------------------------------------------------------------------------------------------------

def markdown_table(results: dict[str, list[dict[str, float]]], size_mib: int) -> str:
    """One row per transfer, in the order run."""
    from boto3.s3.transfer import TransferConfig

    from kiln.tasks.storage.s3 import TRANSFER

    parts = ", ".join(f"{name} {c.multipart_chunksize // MiB} MiB parts x {c.max_concurrency} threads"
                      for name, c in (("ours", TRANSFER), ("peer", TransferConfig())))
    lines = [f"{size_mib} MiB file, moto on loopback ({parts}); MB/s = 10^6 bytes/s; best round per side in bold.",
             "",
             "| round | side | upload MB/s | download MB/s | combined MB/s | peak RSS MiB | RSS before MiB |",
             "|---|---|---|---|---|---|---|"]
    rows = sorted(((r["round"], side, r) for side, runs in results.items() for r in runs), key=lambda t: t[:2])
    for rnd, side, r in rows:
        name = f"**{side}**" if r is best(results[side]) else side
        lines.append(f"| {rnd} | {name} | {r['upload_mbps']:.0f} | {r['download_mbps']:.0f} | "
                     f"{r['combined_mbps']:.0f} | {r['peak_rss_mib']:.0f} | {r['rss_before_mib']:.0f} |")
    return "\n".join(lines)


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    return max(runs, key=lambda r: r["combined_mbps"])


def report(results: dict[str, list[dict[str, float]]], size_mib: int) -> None:
    """Print the table, the memory verdict and the JSON result line (last)."""
    details = markdown_table(results, size_mib)
    print(details, flush=True)
    ours, peer = best(results["ours"]), best(results["peer"])
    rss = max(r["peak_rss_mib"] for r in results["ours"])
    peer_rss = max(r["peak_rss_mib"] for r in results["peer"])
    print(f"peak RSS of our transfers: {rss:.0f} MiB (target <= {TARGET_RSS_MIB} MiB: "
          f"{'met' if rss <= TARGET_RSS_MIB else 'NOT met'}); TransferManager's {peer_rss:.0f} MiB", flush=True)
    line = {"name": "storage_transfer", "value": round(ours["combined_mbps"], 3), "unit": "MB/s",
            "peer": (f"boto3 TransferManager, default TransferConfig, {size_mib} MiB up + down on loopback moto "
                     f"(up {peer['upload_mbps']:.0f} / down {peer['download_mbps']:.0f} MB/s, peak RSS "
                     f"{peer_rss:.0f} MiB; ours up {ours['upload_mbps']:.0f} / down {ours['download_mbps']:.0f} "
                     f"MB/s with sha256, peak RSS {rss:.0f} MiB, target <= {TARGET_RSS_MIB} MiB)"),
            "peer_value": round(peer["combined_mbps"], 3),
            "ratio": round(ours["combined_mbps"] / peer["combined_mbps"], 3), "target": f">= {TARGET_RATIO:g}",
            "peak_rss_mib": round(rss, 1), "details": details}
    print(json.dumps(line), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=SIZE_MIB, help="file size in MiB (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds, alternating order (default %(default)s)")
    # Child mode, used by the parent only.
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    for name in ("--endpoint", "--bucket", "--source", "--work"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.rounds < 1:
        parser.error("--size-mib and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    report(run_rounds(args.size_mib, args.rounds), args.size_mib)


if __name__ == "__main__":
    main()
