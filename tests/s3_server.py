"""An S3 API on loopback for the ``s3`` tests: moto's standalone server in its own process.

boto3 talks to it over HTTP exactly as to AWS. moto keeps its buckets in memory, so a test that needs the endpoint
to die mid-upload and come back with its data kills a TCP forwarder between the store and moto instead (also its
own process, started by running this file): to the store that is exactly an S3 endpoint going away and coming
back, and the bucket's contents survive for the checks after the restart. A forwarder can also be told to die by
itself in the middle of the first upload into a version prefix, so the cut lands inside a step's publish whatever
the step's timing.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import free_port

#: The test session's credentials and region; moto accepts any keys unless IAM checks are switched on.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _output(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: IO[bytes], timeout_s: float = 60.0) -> None:
    """Return once ``port`` accepts connections; fail with the process's output (``log``) if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = _output(log)
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode} before listening:\n{out[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # the poll interval of a wait-for condition
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s ({proc.args})")


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


@dataclass
class S3Endpoint:
    """moto on ``moto_port`` and a forwarder on ``port``; stores under test use :attr:`url` (the forwarder)."""

    moto_port: int
    port: int
    extra_env: dict[str, str] = field(default_factory=dict)
    moto: subprocess.Popen[bytes] | None = None
    forwarder: subprocess.Popen[bytes] | None = None
    #: The processes' output goes to unnamed temporary files: moto logs every request, and a pipe nobody reads
    #: would fill up and stall the server.
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def moto_url(self) -> str:
        """moto itself, for checks that must not go through the forwarder the test kills."""
        return f"http://127.0.0.1:{self.moto_port}"

    def start(self) -> None:
        env = {**os.environ, **AWS_ENV, **self.extra_env}
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)]
        log = self._log()
        self.moto = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.moto_port, self.moto, log)
        self.start_forwarder()

    def _log(self) -> IO[bytes]:
        self._logs.append(tempfile.TemporaryFile())
        return self._logs[-1]

    def start_forwarder(self, die_mid_upload: bool = False) -> None:
        """Start the forwarder on :attr:`port`; ``die_mid_upload``: it exits by itself halfway through the body of
        the first PUT into a version prefix (``…/.v/…``), as an endpoint that goes away mid-upload."""
        log = self._log()
        self.forwarder = subprocess.Popen([sys.executable, __file__, str(self.port), str(self.moto_port), "0",
                                           str(int(die_mid_upload))], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.forwarder, log)

    def forwarder_died(self) -> bool:
        """Whether the forwarder has exited (by itself, unless :meth:`kill_forwarder` was called)."""
        return self.forwarder is not None and self.forwarder.poll() is not None

    @contextmanager
    def throttling(self, gets: int) -> Iterator[str]:
        """A second way in to moto that answers the first ``gets`` GET requests with 503 SlowDown, as a throttling
        S3 does; yields its URL."""
        port, log = free_port(), self._log()
        proc = subprocess.Popen([sys.executable, __file__, str(port), str(self.moto_port), str(gets)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            _kill(proc)

    def kill_forwarder(self) -> None:
        """SIGKILL the endpoint the store talks to: open connections reset, new ones are refused."""
        _kill(self.forwarder)

    def stop(self) -> None:
        _kill(self.forwarder)
        _kill(self.moto)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def client(self, direct: bool = False, **kwargs: Any) -> Any:
        """A plain boto3 S3 client for set-up and checks (``direct``: to moto, bypassing the forwarder)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.moto_url if direct else self.url, region_name="us-east-1",
                            **kwargs)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """moto behind a forwarder for the whole session, with the test credentials in the environment."""
    endpoint = S3Endpoint(moto_port=free_port(), port=free_port())
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        # Keep a developer's own AWS profile and config files out of the tests.
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(Path(os.devnull)))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(Path(os.devnull)))
        endpoint.start()
        try:
            yield endpoint
        finally:
            endpoint.stop()


@dataclass(frozen=True)
class LockedBucket:
    """A second moto that checks IAM: the bucket ``locked`` and the keys of a user without any rights."""

    endpoint: S3Endpoint
    key_id: str
    secret: str


@pytest.fixture(scope="session")
def iam_endpoint(s3_endpoint: S3Endpoint) -> Iterator[LockedBucket]:
    """A second moto that checks IAM after its first 3 requests (a bucket, a user, that user's access key)."""
    import boto3

    endpoint = S3Endpoint(moto_port=free_port(), port=free_port(), extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    endpoint.start()
    try:
        endpoint.client(direct=True).create_bucket(Bucket="locked")
        iam = boto3.client("iam", endpoint_url=endpoint.moto_url, region_name="us-east-1")
        iam.create_user(UserName="no-rights")
        key = iam.create_access_key(UserName="no-rights")["AccessKey"]
        yield LockedBucket(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        endpoint.stop()


#: The request line of an upload (a PutObject or an UploadPart) into a version prefix of the store.
_VERSION_PUT = re.compile(rb"PUT [^ ]*/\.v/[^ ]* HTTP/1\.1\r\n")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, die_mid_upload: bool = False) -> None:
    """Copy ``reader`` to ``writer``; with ``die_mid_upload``, once a request uploads into a version prefix, copy
    its head and half of the body bytes that come with or after it, then exit the whole process (every connection
    drops)."""
    tail = b""  # the end of the previous read, for a request line split across two reads
    try:
        while data := await reader.read(1 << 16):
            window = tail + data
            match = _VERSION_PUT.search(window) if die_mid_upload else None
            head_end = window.find(b"\r\n\r\n", match.end()) if match else -1
            if head_end < 0:  # no such upload yet, or its head goes on in the next read
                writer.write(data)
                await writer.drain()
                tail = window[-512:] if die_mid_upload else b""
                continue
            body_start = head_end + 4
            writer.write(window[len(tail):body_start])
            body = window[body_start:] or await reader.read(1 << 16)
            writer.write(body[:len(body) // 2])
            await writer.drain()
            os._exit(1)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


_SLOW_DOWN_BODY = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                   b"<Message>Please reduce your request rate.</Message></Error>")
#: What AWS answers a client it throttles (and what the store must retry, with backoff).
SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
             b"Content-Length: %d\r\n\r\n" % len(_SLOW_DOWN_BODY) + _SLOW_DOWN_BODY)


async def _forward(listen_port: int, target_port: int, throttle_gets: int = 0, die_mid_upload: int = 0) -> None:
    """Forward TCP connections; with ``throttle_gets``, answer the first request of that many connections that
    start with a GET with 503 SlowDown instead (a throttled client opens a new connection for its retry); with
    ``die_mid_upload``, exit halfway through the first upload into a version prefix."""
    throttled = 0

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        nonlocal throttled
        head = b""
        if throttled < throttle_gets:
            head = await client_r.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET "):
                throttled += 1
                client_w.write(SLOW_DOWN)
                await client_w.drain()
                client_w.close()
                return
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        server_w.write(head)
        await asyncio.gather(_pipe(client_r, server_w, bool(die_mid_upload)), _pipe(server_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":  # python tests/s3_server.py LISTEN TARGET [THROTTLE_GETS [DIE_MID_UPLOAD]]: a forwarder
    asyncio.run(_forward(*(int(a) for a in sys.argv[1:5])))
