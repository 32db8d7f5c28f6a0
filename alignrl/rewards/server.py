"""``alignrl serve-reward``: any registered reward (or a weighted multi-reward) over HTTP, for ``reward=remote``.

Binds 127.0.0.1 unless told otherwise, and refuses another address without a bearer token unless
``serve.insecure=true``; the token comes from ``ALIGNRL_REWARD_TOKEN``, ``serve.token_file`` or ``serve.token``.
The protocol is typed (``alignrl.rewards.protocol``), never pickle. Concurrent requests are queued and scored
together, up to ``serve.max_batch`` images and waiting at most ``serve.batch_wait_ms``, on one worker thread
(rewards need not be thread-safe); each caller gets its own slice.

Hostile or broken clients are bounded before they cost memory or sockets:

- bodies over ``serve.max_request_mb`` get 413 before they are held; bodies held at once (all connections)
  stay under ``serve.max_inflight_mb`` (later ones wait, at most ``serve.queue_timeout_s``, then 503);
- every size a request declares (image count, PNG header sizes, the safetensors shape and offsets) is checked
  before anything is decoded: over ``serve.max_image_pixels`` per image or ``serve.max_request_pixels`` per
  request is 413; decoded pixels held at once stay under ``serve.max_inflight_pixels`` (later requests wait);
- request headers must arrive within ``serve.header_timeout_s`` (idle keep-alive connections are closed after
  it too) and a body within ``serve.body_timeout_s`` (else 408); past ``serve.max_connections`` open
  connections the longest-idle one is closed (a new one gets 503 when all are busy).

Endpoints: ``GET /health`` (no auth), ``GET /info`` and ``POST /score`` (auth when a token is set).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import socket
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignrl.errors import ConfigError
from alignrl.rewards.protocol import (
    FORMATS, JSON_TYPE, PROTOCOL_VERSION, SAFETENSORS_TYPE, TOKEN_ENV, Limits, ProtocolError, ScoreRequest,
    encode_response, inspect_request, is_number, read_token_file,
)

log = logging.getLogger("alignrl.serve")
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11's limit; a longer header block is a 400)
_INTS = ("port", "max_batch", "max_image_pixels", "max_request_pixels", "max_inflight_pixels", "max_connections")
_FLOATS = ("max_request_mb", "batch_wait_ms", "max_inflight_mb", "header_timeout_s", "body_timeout_s",
           "queue_timeout_s")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    token_file: str | None = None
    insecure: bool = False
    max_request_mb: float = 64.0
    max_batch: int = 64
    batch_wait_ms: float = 2.0
    max_image_pixels: int = 2048 * 2048
    max_request_pixels: int = 16 * 2**20
    max_inflight_pixels: int = 64 * 2**20
    max_inflight_mb: float = 256.0
    max_connections: int = 128
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    queue_timeout_s: float = 60.0

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None, *, env: bool = True) -> "ServeOptions":
        """From the ``serve:`` config node, checked. The token: ``serve.token``, else ``serve.token_file``, else
        (``env``) ``ALIGNRL_REWARD_TOKEN``. A non-loopback host without a token is refused unless ``insecure``."""
        node = dict(node or {})
        unknown = set(node) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown serve option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        opts = cls(**node)
        given = lambda v: v not in (None, "")  # noqa: E731
        if given(opts.token) and given(opts.token_file):
            raise ConfigError("set one of serve.token and serve.token_file, not both")
        if given(opts.token):
            opts.token = str(opts.token)
        elif given(opts.token_file):
            opts.token = read_token_file(opts.token_file, "serve.token_file")
        else:
            opts.token = (os.environ.get(TOKEN_ENV) or None) if env else None
        try:
            for name in _INTS:
                setattr(opts, name, int(getattr(opts, name)))
            for name in _FLOATS:
                setattr(opts, name, float(getattr(opts, name)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"serve options must be numbers where numbers are expected: {e}") from None
        if not 0 <= opts.port <= 65535:
            raise ConfigError(f"serve.port={opts.port} is not a port; use 1-65535 (0 picks a free one)")
        for name in (*_INTS[1:], *_FLOATS):
            if getattr(opts, name) <= 0 and name != "batch_wait_ms":
                raise ConfigError(f"serve.{name} must be > 0, got {getattr(opts, name)}")
        if opts.batch_wait_ms < 0:
            raise ConfigError(f"serve.batch_wait_ms must be >= 0, got {opts.batch_wait_ms}")
        for each, total in (("max_request_pixels", "max_inflight_pixels"), ("max_request_mb", "max_inflight_mb")):
            if getattr(opts, each) > getattr(opts, total):
                raise ConfigError(f"serve.{each}={getattr(opts, each):g} exceeds serve.{total}="
                                  f"{getattr(opts, total):g}: one request could never be served; raise {total}")
        if not isinstance(opts.insecure, bool):
            raise ConfigError(f"serve.insecure must be true or false, got {opts.insecure!r}")
        opts.host = str(opts.host)
        if not _is_loopback(opts.host) and not opts.token and not opts.insecure:
            raise ConfigError(f"serve.host={opts.host or '(all interfaces)'} is reachable from the network but no "
                              f"token is set; set {TOKEN_ENV} or serve.token_file=<file holding the token> (or "
                              "--insecure (serve.insecure=true) to serve anyone who reaches the port, without auth)")
        return opts

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * 1024 * 1024)


class RewardFailed(Exception):
    """The reward raised while scoring a batch (answered with 500)."""


class Budget:
    """An amount (decoded pixels, body bytes) shared by concurrent requests, granted first come first served.

    ``acquire`` waits until the amount fits, at most ``timeout`` seconds, and says whether it got it;
    ``release`` gives it back (synchronous, so it is safe in ``finally`` blocks of cancelled tasks)."""

    def __init__(self, capacity: int):
        self.capacity, self.used, self.peak, self.waits, self.refusals = int(capacity), 0, 0, 0, 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def _take(self, amount: int) -> None:
        self.used += amount
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiters:
            amount, fut = self._waiters[0]
            if fut.done():  # gave up
                self._waiters.popleft()
            elif self.used + amount <= self.capacity:
                self._waiters.popleft()
                self._take(amount)
                fut.set_result(True)
            else:
                return

    async def acquire(self, amount: int, timeout: float) -> bool:
        if not self._waiters and self.used + amount <= self.capacity:
            self._take(amount)
            return True
        self.waits += 1
        entry = (amount, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(entry[1], timeout)
            return True
        except asyncio.TimeoutError:
            self.refusals += 1
            self._abandon(entry)
            return False
        except BaseException:  # cancelled: the client went away
            self._abandon(entry)
            raise

    def _abandon(self, entry: tuple[int, asyncio.Future]) -> None:
        amount, fut = entry
        if fut.done() and not fut.cancelled():  # granted just as we stopped waiting
            self.release(amount)
            return
        fut.cancel()
        self._wake()  # those behind may fit now

    def release(self, amount: int) -> None:
        self.used -= amount
        self._wake()

    def as_dict(self, name: str) -> dict:
        return {name: self.used, f"peak_{name}": self.peak, f"{name}_waits": self.waits,
                f"{name}_refusals": self.refusals}


@dataclass
class ConnectionStats:
    """What the connection guard (``guarded_protocol``) did; shown under ``limits`` in ``/info``."""

    open_connections: int = 0  # sockets held (counting those being closed)
    peak_connections: int = 0  # most open at once, not counting those being closed
    evicted_idle: int = 0  # closed to make room past serve.max_connections
    refused_busy: int = 0  # new connections refused (503) because every open one had a request in progress
    idle_closed: int = 0  # no request within serve.header_timeout_s
    header_timeouts: int = 0  # a request begun but its headers not finished in time (408)
    body_timeouts: int = 0  # a body not finished within serve.body_timeout_s (408)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------- batching
@dataclass
class _Job:
    request: ScoreRequest
    future: asyncio.Future

    @property
    def size(self) -> int:
        return len(self.request)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.request.images.shape[1:])


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    images: int = 0
    largest_batch_requests: int = 0
    failed_requests: int = 0
    loop_errors: int = 0  # unexpected errors of the batching loop itself (it keeps running; see the log)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Batcher:
    """Queues score requests and runs them in batches on one worker thread."""

    reward: Any
    max_batch: int
    wait_s: float
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self):
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._getter: asyncio.Task | None = None
        self._held: deque[_Job] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignrl-reward")

    def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for task in (self._task, self._getter):
            if task is not None:
                task.cancel()
        self._task = self._getter = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, request: ScoreRequest) -> dict:
        self.start()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(request, future))
        return await future

    async def _next(self, timeout: float | None) -> _Job | None:
        """The next job (held ones first), or None after ``timeout`` seconds; never loses a queued job."""
        if self._held:
            return self._held.popleft()
        if self._getter is None:
            self._getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({self._getter}, timeout=timeout)
        if not done:
            return None
        job, self._getter = self._getter.result(), None
        return job

    async def _collect(self) -> list[_Job]:
        first = await self._next(None)
        batch, total = [first], first.size
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while total < self.max_batch:
            job = await self._next(max(0.0, deadline - asyncio.get_running_loop().time()))
            if job is None:
                break
            if total + job.size > self.max_batch or job.image_shape != first.image_shape:
                self._held.appendleft(job)  # first in the next batch
                break
            batch.append(job)
            total += job.size
        return batch

    def queued(self) -> int:
        """Requests waiting for a batch."""
        return (self._queue.qsize() if self._queue is not None else 0) + len(self._held)

    async def _run(self) -> None:
        while True:
            batch: list[_Job] = []
            try:
                batch = await self._collect()
                await self._score_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the loop must outlive any bug in it: a dead loop leaves every caller waiting
                self.stats.loop_errors += 1
                log.error("batching loop: %s: %s", type(e).__name__, e, exc_info=True)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(RewardFailed(f"{type(e).__name__}: {e}"))

    async def _score_batch(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        batch = [j for j in batch if not j.future.done()]  # callers that went away
        if not batch:
            return
        # a failure here (not the reward's: _score_jobs answers those) reaches _run, which fails the batch's callers
        results = await loop.run_in_executor(self._executor, self._score_jobs, batch)
        self.stats.requests += len(batch)
        self.stats.batches += 1
        self.stats.images += sum(j.size for j in batch)
        self.stats.largest_batch_requests = max(self.stats.largest_batch_requests, len(batch))
        for job, result in zip(batch, results):
            if job.future.done():
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _score_jobs(self, batch: list[_Job]) -> list[dict | Exception]:
        """Score the batch together; if that raises, score each request alone so only the culprit fails."""
        try:
            return self._score(batch)
        except Exception as e:  # reported to the callers (500); the server keeps serving
            if len(batch) == 1:
                self.stats.failed_requests += 1
                log.error("reward raised %s: %s", type(e).__name__, e, exc_info=True)
                return [RewardFailed(f"{type(e).__name__}: {e}")]
        return [r for job in batch for r in self._score_jobs([job])]

    def _score(self, batch: list[_Job]) -> list[dict]:
        import torch

        # one float32 buffer filled in place (no per-request float copies next to the batch)
        images = torch.empty((sum(j.size for j in batch), *batch[0].image_shape), dtype=torch.float32)
        start = 0
        for j in batch:
            part = images[start:start + j.size]
            part.copy_(j.request.images)
            if j.request.images.dtype == torch.uint8:
                part.div_(255.0)
            start += j.size
        prompts = [p for j in batch for p in j.request.prompts]
        metadata = [m for j in batch for m in j.request.metadata]
        n = len(prompts)
        scores, info = self.reward(images, prompts, metadata)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        info = dict(info or {})
        per_reward, per_sample = ({k: np.asarray(v, dtype=np.float64).reshape(-1)
                                   for k, v in (info.pop(key, None) or {}).items()} for key in ("per_reward", "per_sample"))
        if not per_reward:  # a bare reward, not a WeightedReward
            per_reward = {getattr(self.reward, "reward_name", "reward"): scores}
        for name, arr in [("scores", scores), *per_reward.items(), *per_sample.items()]:
            if arr.shape[0] != n:
                raise ValueError(f"reward returned {arr.shape[0]} values for '{name}' on {n} images")
        shared = {k: v for k, v in info.items() if is_number(v)}
        shared.update(batch_images=n, batch_requests=len(batch))
        out, start = [], 0
        for job in batch:
            sl = slice(start, start + job.size)
            start += job.size
            out.append(encode_response(scores[sl], {k: v[sl] for k, v in per_reward.items()},
                                       {k: v[sl] for k, v in per_sample.items()}, shared))
        return out


# ---------------------------------------------------------------------------------------- the app
def create_app(reward, options: ServeOptions, connections: ConnectionStats | None = None):
    """The FastAPI app serving ``reward`` (a WeightedReward or any reward callable). ``connections`` is what
    the connection guard of ``build_server`` records (shown in ``/info``)."""
    batcher = Batcher(reward, options.max_batch, options.batch_wait_ms / 1000.0)
    started = time.monotonic()
    expected = ("Bearer " + options.token).encode() if options.token else None
    limit = options.max_request_bytes
    drain_cap = limit + max(limit, 16 * 1024 * 1024)  # read (and drop) at most this much of a refused body
    limits = Limits(options.max_batch, options.max_image_pixels, options.max_request_pixels)
    pixels = Budget(options.max_inflight_pixels)  # decoded pixels held by requests (decoding, queued, scored)
    body_bytes = Budget(options.max_inflight_bytes)  # request bodies being received or held before decoding
    connections = connections if connections is not None else ConnectionStats()
    closing = {"Connection": "close"}  # for answers sent before the body was read: the rest is not awaited

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="alignrl reward server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.options = options
    app.state.connections = connections

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return JSONResponse({"error": f"internal server error: {type(exc).__name__}: {exc}"}, status_code=500)

    async def receive(request: Request, deadline: float) -> dict | None:
        """The next ASGI message of the body, or None when ``deadline`` (loop time) passes first."""
        try:
            return await asyncio.wait_for(request.receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            return None

    async def chunks(request: Request, deadline: float):
        """The body's chunks as they arrive (ASGI messages: no buffering, and we know when it ended)."""
        while True:
            message = await receive(request, deadline)
            if message is None:
                connections.body_timeouts += 1
                raise HTTPException(408, f"the request body did not arrive within serve.body_timeout_s="
                                         f"{options.body_timeout_s:g} s; a stalled upload is dropped", headers=closing)
            if message["type"] != "http.request":  # the client went away
                raise HTTPException(400, "client disconnected")
            yield message.get("body", b""), message.get("more_body", False)

    def body_deadline() -> float:
        return asyncio.get_running_loop().time() + options.body_timeout_s

    async def drain(request: Request, deadline: float, seen: int = 0) -> bool:
        """Drop the unread body (bounded, until ``deadline``) so the client reads our error answer rather than
        a reset; False when it did not end (then the answer closes the connection)."""
        while True:
            message = await receive(request, deadline)
            if message is None or message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
            if seen > drain_cap:
                return False

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            drained = request.method != "POST" or await drain(request, body_deadline())
            raise HTTPException(401, "missing or wrong bearer token; send 'Authorization: Bearer <token>' (the "
                                     f"client reads it from {TOKEN_ENV} or reward.remote.token_file)",
                                headers={"WWW-Authenticate": "Bearer", **({} if drained else closing)})

    def too_large(size: str, drained: bool) -> HTTPException:
        return HTTPException(413, f"request body is {size}, over the server's limit of {options.max_request_mb:g} MB "
                                  "(serve.max_request_mb); send fewer images per request (reward.remote.batch_size)",
                             headers=None if drained else closing)

    def busy(what: str, drained: bool) -> HTTPException:
        return HTTPException(503, f"the server is busy: {what} stayed at its limit for serve.queue_timeout_s="
                                  f"{options.queue_timeout_s:g} s; retry shortly",
                             headers={"Retry-After": "1", **({} if drained else closing)})

    async def read_body(request: Request) -> tuple[bytearray, int]:
        """The whole body, and the bytes reserved for it in ``body_bytes`` (the caller releases them)."""
        declared = request.headers.get("content-length")
        declared_n = None
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                raise HTTPException(400, "Content-Length is not a number", headers=closing) from None
            if declared_n > limit:
                drained = declared_n <= drain_cap and await drain(request, body_deadline())
                raise too_large(f"{declared_n / 2**20:.1f} MB", drained)
        reserved = limit if declared_n is None else declared_n  # chunked: the most it may grow to
        if not await body_bytes.acquire(reserved, options.queue_timeout_s):
            raise busy(f"request bodies held (serve.max_inflight_mb={options.max_inflight_mb:g})", drained=False)
        try:
            body = bytearray()
            async for chunk, more in chunks(request, body_deadline()):  # the deadline starts once admitted
                if len(body) + len(chunk) > limit:
                    seen = len(body) + len(chunk)
                    body = None
                    drained = not more or await drain(request, body_deadline(), seen)
                    raise too_large(f"over {seen / 2**20:.1f} MB", drained)
                body += chunk
                if not more:
                    return body, reserved
        except BaseException:
            body_bytes.release(reserved)
            raise

    def client_error(e: Exception) -> JSONResponse:
        if isinstance(e, ProtocolError):
            return JSONResponse({"error": str(e)}, status_code=e.status)
        # a body shaped in a way the checks did not foresee is still the client's error
        return JSONResponse({"error": f"malformed request ({type(e).__name__}: {e})"}, status_code=400)

    malformed = (ProtocolError, TypeError, ValueError, AttributeError, OverflowError, RecursionError)

    @app.get("/health")
    async def health():
        return {"status": "ok", "uptime_s": round(time.monotonic() - started, 3), "protocol": PROTOCOL_VERSION}

    @app.get("/info")
    async def info(request: Request):
        await authorize(request)
        return {
            "protocol": PROTOCOL_VERSION,
            "rewards": list(getattr(reward, "rewards", {}) or [getattr(reward, "reward_name", "reward")]),
            "weights": dict(getattr(reward, "weights", {}) or {}),
            "per_sample_keys": list(getattr(reward, "per_sample_keys", []) or []),
            "max_batch": options.max_batch,
            "batch_wait_ms": options.batch_wait_ms,
            "max_request_mb": options.max_request_mb,
            "max_image_pixels": options.max_image_pixels,
            "max_request_pixels": options.max_request_pixels,
            "formats": sorted(FORMATS),
            "auth": expected is not None,
            "uptime_s": round(time.monotonic() - started, 3),
            "stats": {**batcher.stats.as_dict(), "queued_requests": batcher.queued()},
            "limits": {"max_inflight_pixels": options.max_inflight_pixels, "max_inflight_mb": options.max_inflight_mb,
                       "max_connections": options.max_connections, "header_timeout_s": options.header_timeout_s,
                       "body_timeout_s": options.body_timeout_s, "queue_timeout_s": options.queue_timeout_s,
                       **pixels.as_dict("inflight_pixels"), **body_bytes.as_dict("inflight_body_bytes"),
                       **connections.as_dict()},
        }

    @app.post("/score")
    async def score(request: Request):
        await authorize(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (JSON_TYPE, SAFETENSORS_TYPE):
            drained = await drain(request, body_deadline())
            raise HTTPException(415, f"content type {ctype or 'none'!r} is not supported; send {JSON_TYPE} "
                                     f"(PNG images) or {SAFETENSORS_TYPE} (safetensors)",
                                headers=None if drained else closing)
        body, body_reserved = await read_body(request)
        pixels_reserved = 0
        try:
            try:  # declared sizes only: nothing is decoded before the budgets admit it
                pending = await asyncio.to_thread(inspect_request, body, ctype, limits)
            except malformed as e:
                return client_error(e)
            del body  # held by `pending` where it must be (a safetensors body is the tensor's memory)
            if not await pixels.acquire(pending.pixels, options.queue_timeout_s):
                raise busy(f"decoded pixels held (serve.max_inflight_pixels={options.max_inflight_pixels})", True)
            pixels_reserved = pending.pixels
            try:
                parsed = await asyncio.to_thread(pending.decode)
            except malformed as e:
                return client_error(e)
            finally:
                del pending
                body_bytes.release(body_reserved)  # decoded: the pixel reservation covers what is left
                body_reserved = 0
            try:
                return await batcher.submit(parsed)
            except RewardFailed as e:
                return JSONResponse({"error": f"reward raised {e}"}, status_code=500)
        finally:
            body_bytes.release(body_reserved)
            pixels.release(pixels_reserved)

    return app


# ---------------------------------------------------------------------------------------- connections
def guarded_protocol(options: ServeOptions, stats: ConnectionStats) -> type:
    """uvicorn's h11 protocol with the limits uvicorn lacks: a deadline for a request's headers (uvicorn only
    times out idle keep-alive connections, and only after a first answer), and at most
    ``options.max_connections`` open connections (past it the longest-idle one is closed; when every one has a
    request in progress, the new one is answered 503)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    def raw_answer(status: int, reason: str, message: str, extra: str = "") -> bytes:
        body = ('{"error": "%s"}' % message).encode()
        return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{extra}connection: close\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode() + body

    timed_out = raw_answer(408, "Request Timeout", f"request headers did not arrive within serve.header_timeout_s="
                                                   f"{options.header_timeout_s:g} s")
    full = raw_answer(503, "Service Unavailable", f"the server has serve.max_connections={options.max_connections} "
                                                  "connections busy; retry shortly", "retry-after: 1\r\n")

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = None
            stats.open_connections += 1
            self._arm()
            live = [c for c in self.connections if c is not self and not c.transport.is_closing()]
            if len(live) >= options.max_connections:
                idle = [c for c in live if isinstance(c, GuardedH11Protocol) and c._idle()]
                if not idle:
                    stats.refused_busy += 1
                    transport.write(full)
                    transport.close()
                    return
                stats.evicted_idle += 1
                min(idle, key=lambda c: c._idle_since)._expire(count=False)
                live.remove(min(idle, key=lambda c: c._idle_since))
            stats.peak_connections = max(stats.peak_connections, len(live) + 1)

        def _idle(self) -> bool:
            """No request in progress: none yet, headers still coming, or between keep-alive requests."""
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            """Start the header deadline (a new connection, or one that just finished a request)."""
            self._disarm()
            self._idle_cycle, self._idle_since, self._idle_bytes = self.cycle, self.loop.time(), 0
            self._deadline = self.loop.call_later(options.header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self, count: bool = True) -> None:
            self._deadline = None
            if self.transport.is_closing() or not self._idle():
                return
            if self._idle_bytes and self.conn.our_state is h11.IDLE:  # a request begun, never finished
                stats.header_timeouts += count
                self.transport.write(timed_out)
            else:
                stats.idle_closed += count
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            self._idle_bytes += len(data)
            super().data_received(data)
            if self.cycle is not self._idle_cycle:  # a request's headers arrived: its body has its own deadline
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._idle():  # (not when a pipelined request began)
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            stats.open_connections -= 1
            super().connection_lost(exc)

    return GuardedH11Protocol


def build_server(reward, options: ServeOptions, log_level: str = "warning"):
    """The uvicorn server for ``reward`` with every limit of ``options`` wired in (run it with ``sockets=``)."""
    import uvicorn

    stats = ConnectionStats()
    config = uvicorn.Config(
        create_app(reward, options, stats), http=guarded_protocol(options, stats), log_level=log_level,
        access_log=False, timeout_graceful_shutdown=5,
        timeout_keep_alive=options.header_timeout_s,  # idle keep-alive connections (also closed by the guard)
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        # a backstop on request tasks, which can outlive their connections (503 past it)
        limit_concurrency=2 * options.max_connections + 1)
    return uvicorn.Server(config)


# ---------------------------------------------------------------------------------------- serve
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit TCP_NODELAY: without it a response written as headers + body
        # waits for the client's delayed ACK (about 40 ms per request on Linux)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_for(host: str, port: int) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def serve(cfg) -> int:
    """Build the configured reward, bind, print where it listens, and serve until interrupted."""
    from alignrl.components import as_dict
    from alignrl.rewards.base import WeightedReward

    options = ServeOptions.from_config(as_dict(cfg.get("serve")))  # refuses an open host without a token
    reward = WeightedReward.from_config(as_dict(cfg.reward))  # loads models before the port opens
    try:
        sock = bind_socket(options.host, options.port)
    except OSError as e:
        raise ConfigError(f"cannot listen on {options.host}:{options.port} ({e.strerror or e}); "
                          "pick another serve.port (0 picks a free one)") from None
    port = sock.getsockname()[1]
    url = url_for(options.host, port)
    names = ", ".join(f"{n} (weight {w:g})" for n, w in reward.weights.items())
    say = lambda msg: print(f"alignrl: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"serving {names} at {url} (protocol {PROTOCOL_VERSION}, max_batch {options.max_batch}, "
        f"auth {'on' if options.token else 'off'})")
    if not _is_loopback(options.host):
        if options.token:
            say(f"warning: listening on {options.host}, reachable from the network over plain HTTP; "
                "prefer an SSH tunnel or a TLS proxy")
        else:
            say(f"warning: listening on {options.host} with no token (serve.insecure=true): anyone who reaches "
                f"port {port} can use this reward")
    hint = f" and the same token (reward.remote.token_file or {TOKEN_ENV})" if options.token else ""
    say(f"point a client at it: alignrl train reward=remote reward.remote.url={url}{hint}")
    build_server(reward, options).run(sockets=[sock])
    return 0


@contextmanager
def serve_in_background(reward, **options):
    """Serve ``reward`` from a thread of this process on a free loopback port; yields the URL.

    For notebooks, benchmarks and tests: ``with serve_in_background(r) as url: RemoteReward(url=url)``.
    ``options`` are ``serve.*`` settings (checked as the CLI checks them; no token unless given).
    """
    import threading

    opts = ServeOptions.from_config({"port": 0, **options}, env=False)
    sock = bind_socket(opts.host, opts.port)
    server = build_server(reward, opts, log_level="critical")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="reward-server")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the in-process reward server did not start")
        time.sleep(0.01)
    try:
        yield url_for(opts.host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
