"""The model server's HTTP app (Starlette on uvicorn): predict, feedback, health, ready, metrics, reload, stats.

``POST /predict`` (scope ``predict``) and ``/admin/*`` (scope ``admin``) need a bearer token that holds the scope
for this server's pipeline (:mod:`.tokens`): 401 without a known token, 403 with one that lacks the scope or the
pipeline. Bodies, read times and connections are bounded before a request reaches the app (:mod:`.protocol`).

``POST /predict`` is the hot path and is written for it: the body is parsed with orjson from the raw bytes, the
token is compared in constant time against the raw header, metric children are bound in advance, responses are
pre-serialised bytes, and the records of concurrent requests share one forward pass (:mod:`.batching`). Each
request is routed to the canary with probability ``share``; a canary that fails inside the model is counted and
the request is answered by the champion, so a canary never fails a user request.

Every ``/predict`` answer carries ``X-Request-Id``; a share of the answered requests (the deployment's
``capture.share``) is captured, and ``POST /feedback`` takes the ground truth for a captured request by its id
(:mod:`.capture`: the capture is one append after the answer is computed; files are written off the event loop).
``GET /metrics`` also shows the pipeline monitor's latest figures, read from the store (:mod:`.monitor_gauges`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from kiln.tasks.bundle.load import RecordError
from kiln.tasks.serving import tokens
from kiln.tasks.serving.capture import RequestIds, caller_request_id
from kiln.tasks.serving.capture_format import parse_feedback
from kiln.tasks.serving.inputs import RequestError, parse_records, transform
from kiln.tasks.serving.metrics import METRICS_CONTENT_TYPE
from kiln.tasks.serving.models import ModelSet, Variant
from kiln.tasks.serving.state import ServerState

log = logging.getLogger(__name__)

JSON = "application/json"
_HEALTH = orjson.dumps({"status": "ok"})
_UNAUTHORIZED = orjson.dumps({"detail": "missing or invalid bearer token (Authorization: Bearer <token>)"})
_NOT_READY = orjson.dumps({"detail": "no model is loaded"})
def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers, media_type=JSON)


def _invalid(errors: list[dict[str, str]]) -> Response:
    return _json(orjson.dumps({"detail": errors}), 422)


class _ModelFailure(Exception):
    """A prediction failed inside the model (raised, or returned non-finite values)."""


def _describe(exc: BaseException) -> str:
    """One line about ``exc``: TorchScript errors carry a multi-line traceback whose last line is the error."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    return last if len(lines) > 1 and "Error" in last.split(":", 1)[0] else f"{type(exc).__name__}: {last}"


class _Call:
    """One predict request as the serving functions need it."""

    __slots__ = ("models", "records", "started", "caller_id", "nbytes")

    def __init__(self, models: ModelSet, records: list[Any], started: float, caller_id: str | None, nbytes: int):
        self.models, self.records, self.started, self.caller_id, self.nbytes = (models, records, started,
                                                                                caller_id, nbytes)


def _with_id(response: Response, request_id: str) -> Response:
    response.raw_headers.append((b"x-request-id", request_id.encode()))
    return response


async def _predict_on(variant: Variant, x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Predict ``x`` in ``variant``'s next batch; the 200 body and the output rows.

    Raises:
        _ModelFailure: the forward pass raised, or returned non-finite values or a bad shape.
    """
    try:
        y = await variant.batcher.submit(x)
        if not np.isfinite(y).all():
            raise ValueError("the model returned non-finite values")
        predictions = variant.bundle.format_predictions(y)
    except Exception as exc:  # noqa: BLE001 - every model failure is the caller's to count and answer
        raise _ModelFailure(_describe(exc)) from exc
    return variant.head + orjson.dumps(predictions) + b"}", y


def _answered(state: ServerState, variant: Variant, answer: tuple[bytes, np.ndarray], call: _Call) -> Response:
    """Count the answer, capture the request if it is sampled (an append), and answer with its request id."""
    took = time.perf_counter() - call.started
    m = variant.metrics
    m.ok.inc()
    m.records.inc(len(call.records))
    m.latency.observe(took)
    variant.stats.latencies_ms.append(took * 1000)
    deployment = call.models.deployment
    request_id = state.capture.answered(deployment.model, deployment.capture.share, variant, call.records, answer[1],
                                        call.caller_id, call.started, call.nbytes)
    return _with_id(_json(answer[0]), request_id)


async def _serve_champion(state: ServerState, champion: Variant, call: _Call) -> Response:
    try:
        x = transform(champion.bundle, call.records)
    except RecordError as exc:
        champion.metrics.invalid.inc()
        return _invalid(exc.errors)
    except Exception as exc:  # noqa: BLE001 - a bug in the bundle's transform is a model failure, not a crash
        return _champion_failed(state, champion, f"in its transform: {_describe(exc)}", exc)
    champion.stats.requests += 1
    try:
        answer = await _predict_on(champion, x)
    except _ModelFailure as exc:
        return _champion_failed(state, champion, str(exc), exc.__cause__, counted=True)
    return _answered(state, champion, answer, call)


def _champion_failed(state: ServerState, champion: Variant, reason: str, cause: BaseException | None,
                     counted: bool = False) -> Response:
    """Count a champion failure and answer 500 with a short detail."""
    if not counted:
        champion.stats.requests += 1
    champion.stats.errors += 1
    champion.metrics.model_errors.inc()
    champion.metrics.failed.inc()
    state.log_champion_failure("champion version %s failed: %s", champion.version, reason, exc_info=cause)
    return _json(orjson.dumps({"detail": f"the model failed: {reason}"}), 500)


async def _serve_canary(state: ServerState, call: _Call) -> Response:
    canary, champion = call.models.canary, call.models.champion
    assert canary is not None
    try:
        x = transform(canary.bundle, call.records)
    except RecordError as exc:
        # Refused by the canary's transform: the user's fault only if the champion refuses the records too.
        response = await _serve_champion(state, champion, call)
        if response.status_code == 200:
            _canary_failed(state, canary, champion, f"its transform refused records the champion accepts: {exc}")
        return response
    except Exception as exc:  # noqa: BLE001 - a canary failure never fails the request: the champion answers
        _canary_failed(state, canary, champion, f"in its transform: {_describe(exc)}")
        return await _serve_champion(state, champion, call)
    try:
        answer = await _predict_on(canary, x)
    except _ModelFailure as exc:
        _canary_failed(state, canary, champion, str(exc))
        return await _serve_champion(state, champion, call)
    canary.stats.requests += 1
    return _answered(state, canary, answer, call)


def _canary_failed(state: ServerState, canary: Variant, champion: Variant, reason: str) -> None:
    canary.stats.requests += 1
    canary.stats.errors += 1
    canary.metrics.model_errors.inc()
    state.log_canary_failure("canary version %s failed (%s); answered by champion version %s", canary.version,
                             reason, champion.version)


class _Endpoints:
    """The route handlers over one :class:`ServerState`."""

    def __init__(self, state: ServerState):
        self.state = state
        self.refused = state.metrics.refused_by_status
        self._signal_tasks: set[asyncio.Task[Any]] = set()
        # Predict requests being answered: a plain int (one event loop), read when /metrics is scraped.
        self.in_flight = 0
        state.metrics.watch_in_flight(lambda: self.in_flight)

    def _refusal(self, request: Request, scope: tokens.Scope, models: ModelSet | None) -> Response | None:
        """401 without a known token, 403 with one that lacks ``scope`` or this server's pipeline."""
        grant = self.state.tokens.grant(request.scope["headers"])
        if grant is None:
            return _json(_UNAUTHORIZED, 401, {"WWW-Authenticate": "Bearer"})
        if grant is tokens.KILN_GRANT:
            return None
        reason = grant.refusal(scope, models.deployment.model if models is not None else None)
        return None if reason is None else _json(orjson.dumps({"detail": reason}), 403)

    async def predict(self, request: Request) -> Response:
        started = time.perf_counter()
        caller_id = caller_request_id(request.scope["headers"])
        self.in_flight += 1
        try:
            response = await self._predict(request, started, caller_id)
        finally:
            self.in_flight -= 1
        if response.status_code != 200:  # an answer got its id where the request was sampled
            _with_id(response, caller_id or RequestIds.plain())
        return response

    async def _predict(self, request: Request, started: float, caller_id: str | None) -> Response:
        state = self.state
        models = state.models  # this request's model set, whatever a reload does meanwhile
        refused = self._refusal(request, "predict", models)
        if refused is not None:
            self.refused[str(refused.status_code)].inc()
            return refused
        if models is None:
            self.refused["503"].inc()
            return _json(_NOT_READY, 503)
        try:
            body = await request.body()
            records = parse_records(body, state.max_batch)
        except RequestError as exc:
            self.refused[str(exc.status)].inc()
            return _json(orjson.dumps({"detail": exc.detail}), exc.status)
        except ClientDisconnect:  # gone, or cut off by a limit of the protocol (which answered it)
            return Response(status_code=499)
        call = _Call(models, records, started, caller_id, len(body))
        if models.canary is not None and state.random() < models.share:
            return await _serve_canary(state, call)
        return await _serve_champion(state, models.champion, call)

    async def feedback(self, request: Request) -> Response:
        """``POST /feedback``: the ground truth of a captured request, by its ``X-Request-Id``.

        It takes the ``predict`` scope on this pipeline, like ``/predict``: whoever may ask may answer, and a
        client that labels its own requests needs no second token (nor kiln a new scope). An id that names no
        captured request (:class:`~kiln.tasks.serving.capture.RequestIds`) gets 404; a full feedback buffer 503.
        """
        response = await self._feedback(request)
        counter = self.state.metrics.feedback.get(str(response.status_code))
        if counter is not None:  # every status but a disconnect (499)
            counter.inc()
        return response

    async def _feedback(self, request: Request) -> Response:
        models = self.state.models
        if (refused := self._refusal(request, "predict", models)) is not None:
            return refused
        if models is None:
            return _json(_NOT_READY, 503)
        try:
            body = await request.body()
            request_id, labels = parse_feedback(body, self.state.max_batch)
        except RequestError as exc:
            return _json(orjson.dumps({"detail": exc.detail}), exc.status)
        except ClientDisconnect:
            return Response(status_code=499)
        capture, deployment = self.state.capture, models.deployment
        if not capture.ids.is_captured(request_id, deployment.capture.share):
            return _json(orjson.dumps({"detail": f"unknown request id {request_id!r}: feedback is taken only for "
                                                 "captured requests, by the X-Request-Id of their answer"}), 404)
        if not capture.add_feedback(deployment.model, request_id, labels, len(body)):
            return _json(orjson.dumps({"detail": "the feedback buffer is full; retry later"}), 503)
        return _json(orjson.dumps({"request_id": request_id, "stored": len(labels)}))

    async def health(self, request: Request) -> Response:
        return _json(_HEALTH)

    async def ready(self, request: Request) -> Response:
        models = self.state.models
        return _json(orjson.dumps(models.ready())) if models is not None else _json(_NOT_READY, 503)

    async def metrics(self, request: Request) -> Response:
        models = self.state.models
        await self.state.monitor.refresh(models.deployment.model if models is not None else None)
        return Response(self.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def reload(self, request: Request) -> Response:
        if (refused := self._refusal(request, "admin", self.state.models)) is not None:
            return refused
        self.state.tokens.refresh()
        try:
            models = await self.state.reload()
        except Exception as exc:  # noqa: BLE001 - the old models keep serving; the caller gets the reason
            log.error("reload of %s failed; the previous models keep serving: %s", self.state.deployment_path, exc)
            return _json(orjson.dumps({"detail": f"reload failed, the previous models keep serving: {exc}"}), 409)
        return _json(orjson.dumps(models.ready()))

    async def stats(self, request: Request) -> Response:
        models = self.state.models
        if (refused := self._refusal(request, "admin", models)) is not None:
            return refused
        return _json(orjson.dumps(models.stats())) if models is not None else _json(_NOT_READY, 503)

    async def _reload_on_signal(self) -> None:
        log.info("SIGHUP: reloading %s", self.state.deployment_path)
        self.state.tokens.refresh()
        try:
            await self.state.reload()
        except Exception as exc:  # noqa: BLE001 - a signal has no caller to answer; the old models serve on
            log.error("reload on SIGHUP failed; the previous models keep serving: %s", exc)

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_on_signal())
        self._signal_tasks.add(task)  # a reference, so the task is not collected before it ends
        task.add_done_callback(self._signal_tasks.discard)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """SIGHUP reloads the deployment while the app runs (the handler needs uvicorn's running loop); the
        capture flushes while it runs and once more at the end."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        watcher = loop.create_task(self._watch_tokens())
        self.state.capture.start()
        try:
            yield
        finally:
            watcher.cancel()
            loop.remove_signal_handler(signal.SIGHUP)
            await self.state.capture.close()

    async def _watch_tokens(self) -> None:
        """Re-read the tokens file when it changes (a rotation needs no reload and no restart)."""
        while True:
            await asyncio.sleep(tokens.POLL_S)
            self.state.tokens.refresh()


def create_app(state: ServerState) -> Starlette:
    """The HTTP app over ``state``; SIGHUP reloads the deployment while it runs.

    Args:
        state: the shared server state (holds the model set, metrics, token and batch settings).

    Returns:
        A Starlette (ASGI) app: ``POST /predict``, ``POST /feedback``, ``GET /health``, ``GET /ready``,
        ``GET /metrics``, ``POST /admin/reload``, ``GET /admin/stats``.
    """
    endpoints = _Endpoints(state)
    return Starlette(routes=[
        Route("/predict", endpoints.predict, methods=["POST"]),
        Route("/feedback", endpoints.feedback, methods=["POST"]),
        Route("/health", endpoints.health, methods=["GET"]),
        Route("/ready", endpoints.ready, methods=["GET"]),
        Route("/metrics", endpoints.metrics, methods=["GET"]),
        Route("/admin/reload", endpoints.reload, methods=["POST"]),
        Route("/admin/stats", endpoints.stats, methods=["GET"]),
    ], lifespan=endpoints.lifespan)
