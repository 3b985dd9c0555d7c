"""HTTP client of the model server (``python -m kiln.tasks.serving``), used by the deploy steps and the tests.

Every failure raises :class:`ServingError` with a message naming the URL, the HTTP status and the server's
detail; the bearer token never appears in a message.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

log = logging.getLogger(__name__)

#: Seconds between two probes of ``/ready`` while waiting for a server.
READY_POLL_S = 0.1


class ServingError(RuntimeError):
    """A request to the model server failed: unreachable, refused, or answered with an error status."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None,
                 detail: Any = None):
        self.url = url
        self.status = status
        self.detail = detail
        super().__init__(message)


def _detail(response: httpx.Response) -> Any:
    """The server's ``detail`` (FastAPI error bodies), else the start of the body text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    return body.get("detail", body) if isinstance(body, dict) else body


def _body(response: httpx.Response, method: str, url: str) -> Any:
    """The JSON object of a 200 answer."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ServingError(f"{method} {url} answered 200 with a body that is not a JSON object: "
                           f"{response.text[:200]!r}", url=url, status=200)
    return body


class ServingClient:
    """A connection to one model server.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8765``.
        token: the bearer token of ``/predict`` and ``/admin/*`` (``None``: only the open endpoints work).
        timeout_s: per-request timeout.
    """

    def __init__(self, url: str, token: str | None, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __repr__(self) -> str:
        return f"ServingClient({self.url!r})"

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServingError(f"{method} {self.url}{path} failed: {type(exc).__name__}: {exc}",
                               url=f"{self.url}{path}") from exc

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code != 200:
            detail = _detail(response)
            raise ServingError(f"{method} {self.url}{path} answered {response.status_code}: {detail}",
                               url=f"{self.url}{path}", status=response.status_code, detail=detail)
        return _body(response, method, f"{self.url}{path}")

    def health(self) -> bool:
        """Whether the server process answers ``GET /health`` with 200 (``False`` when unreachable)."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def ready(self) -> dict[str, Any] | None:
        """``GET /ready``: ``{"model", "champion": {"version", "runtime"}, "canary": ... | None}``.

        Returns:
            The body, or ``None`` while no model is loaded (503) or the server is unreachable.

        Raises:
            ServingError: any other error status.
        """
        try:
            response = self._http.get("/ready")
        except httpx.HTTPError:
            return None
        if response.status_code == 503:
            return None
        if response.status_code != 200:
            raise ServingError(f"GET {self.url}/ready answered {response.status_code}: {_detail(response)}",
                               url=f"{self.url}/ready", status=response.status_code, detail=_detail(response))
        return _body(response, "GET", f"{self.url}/ready")

    def wait_ready(self, timeout_s: float, version: str | None = None) -> dict[str, Any]:
        """Wait until ``/ready`` answers (and, when ``version`` is given, shows that champion version).

        Args:
            timeout_s: how long to wait.
            version: the champion version to wait for; ``None``: any loaded model.

        Returns:
            The ``/ready`` body.

        Raises:
            ServingError: not ready within ``timeout_s``; the message names the last state seen.
        """
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | None = None
        while True:
            last = self.ready()
            if last is not None and (version is None or str(last["champion"]["version"]) == str(version)):
                return last
            if time.monotonic() >= deadline:
                seen = "no answer or 503" if last is None else f"champion version {last['champion']['version']}"
                want = f"champion version {version}" if version is not None else "a loaded model"
                raise ServingError(f"{self.url} did not become ready with {want} within {timeout_s:g} s "
                                   f"(last seen: {seen})", url=f"{self.url}/ready")
            time.sleep(READY_POLL_S)

    def predict(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """``POST /predict``.

        Args:
            records: raw input rows (JSON-ready values; missing values as ``None``).

        Returns:
            ``{"model", "version", "variant", "predictions": [...]}``, one prediction per record.

        Raises:
            ServingError: refused (401), invalid records (422, ``detail`` lists the fields), too many records
                (413), a model failure (500), or the server is unreachable.
        """
        return self._json("POST", "/predict", json={"records": records})

    def reload(self) -> dict[str, Any]:
        """``POST /admin/reload``: the server re-reads its deployment file and swaps in new models.

        Returns:
            The ``/ready`` body after the reload.

        Raises:
            ServingError: the new deployment could not be loaded (409; the old models keep serving) or the
                request failed.
        """
        return self._json("POST", "/admin/reload")

    def stats(self) -> dict[str, Any]:
        """``GET /admin/stats``: per-variant requests, errors, p50/p99 latency since the last reload.

        Raises:
            ServingError: the request failed.
        """
        return self._json("GET", "/admin/stats")
