"""``alignrl serve-reward``: any registered reward (or a weighted multi-reward) over HTTP, for ``reward=remote``.

Binds 127.0.0.1 unless told otherwise; optional bearer token (``serve.token`` or ``ALIGNRL_REWARD_TOKEN``);
request bodies over ``serve.max_request_mb`` get 413 before they are held in memory; the protocol is typed
(``alignrl.rewards.protocol``), never pickle. Concurrent requests are queued and scored together, up to
``serve.max_batch`` images and waiting at most ``serve.batch_wait_ms``, on one worker thread (rewards need
not be thread-safe); each caller gets its own slice.

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
    FORMATS, JSON_TYPE, PROTOCOL_VERSION, SAFETENSORS_TYPE, ProtocolError, ScoreRequest, decode_request,
    encode_response, is_number,
)

TOKEN_ENV = "ALIGNRL_REWARD_TOKEN"
log = logging.getLogger("alignrl.serve")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_request_mb: float = 64.0
    max_batch: int = 64
    batch_wait_ms: float = 2.0
    max_image_pixels: int = 2048 * 2048

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> "ServeOptions":
        """From the ``serve:`` config node; a null token falls back to ``ALIGNRL_REWARD_TOKEN``."""
        node = dict(node or {})
        unknown = set(node) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown serve option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        opts = cls(**node)
        opts.token = str(opts.token) if opts.token not in (None, "") else (os.environ.get(TOKEN_ENV) or None)
        try:
            opts.port, opts.max_batch = int(opts.port), int(opts.max_batch)
            opts.max_image_pixels = int(opts.max_image_pixels)
            opts.max_request_mb, opts.batch_wait_ms = float(opts.max_request_mb), float(opts.batch_wait_ms)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"serve options must be numbers where numbers are expected: {e}") from None
        if not 0 <= opts.port <= 65535:
            raise ConfigError(f"serve.port={opts.port} is not a port; use 1-65535 (0 picks a free one)")
        for name in ("max_batch", "max_image_pixels", "max_request_mb"):
            if getattr(opts, name) <= 0:
                raise ConfigError(f"serve.{name} must be > 0, got {getattr(opts, name)}")
        if opts.batch_wait_ms < 0:
            raise ConfigError(f"serve.batch_wait_ms must be >= 0, got {opts.batch_wait_ms}")
        opts.host = str(opts.host)
        return opts

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)


class RewardFailed(Exception):
    """The reward raised while scoring a batch (answered with 500)."""


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

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            batch = [j for j in batch if not j.future.done()]  # callers that went away
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._score_jobs, batch)
            except Exception as e:  # a bug here must not leave callers waiting forever
                log.error("batch failed: %s", e, exc_info=True)
                results = [RewardFailed(f"{type(e).__name__}: {e}")] * len(batch)
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

        images = torch.cat([j.request.float_images() for j in batch])
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
def create_app(reward, options: ServeOptions):
    """The FastAPI app serving ``reward`` (a WeightedReward or any reward callable)."""
    batcher = Batcher(reward, options.max_batch, options.batch_wait_ms / 1000.0)
    started = time.monotonic()
    expected = ("Bearer " + options.token).encode() if options.token else None
    limit = options.max_request_bytes
    drain_cap = limit + max(limit, 16 * 1024 * 1024)  # read (and drop) at most this much of a refused body

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="alignrl reward server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.options = options

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return JSONResponse({"error": f"internal server error: {type(exc).__name__}: {exc}"}, status_code=500)

    async def chunks(request: Request):
        """The body's chunks as they arrive (ASGI messages: no buffering, and we know when it ended)."""
        while True:
            message = await request.receive()
            if message["type"] != "http.request":  # the client went away
                raise HTTPException(400, "client disconnected")
            yield message.get("body", b""), message.get("more_body", False)

    async def drain(request: Request, seen: int = 0) -> None:
        """Drop the unread body (bounded) so the client reads our error answer rather than a reset."""
        async for chunk, more in chunks(request):
            seen += len(chunk)
            if not more or seen > drain_cap:
                return

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            if request.method == "POST":
                await drain(request)
            raise HTTPException(401, "missing or wrong bearer token; send 'Authorization: Bearer <serve.token>' "
                                     "(reward.remote.token or ALIGNRL_REWARD_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    def too_large(size: str) -> HTTPException:
        return HTTPException(413, f"request body is {size}, over the server's limit of {options.max_request_mb:g} MB "
                                  "(serve.max_request_mb); send fewer images per request (reward.remote.batch_size)")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                raise HTTPException(400, "Content-Length is not a number") from None
            if declared_n > limit:
                if declared_n <= drain_cap:
                    await drain(request)
                raise too_large(f"{declared_n / 2**20:.1f} MB")
        parts, total = [], 0
        async for chunk, more in chunks(request):
            total += len(chunk)
            if total > limit:
                if more:
                    await drain(request, total)
                raise too_large(f"over {total / 2**20:.1f} MB")
            parts.append(chunk)
            if not more:
                return b"".join(parts)

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
            "formats": sorted(FORMATS),
            "auth": expected is not None,
            "uptime_s": round(time.monotonic() - started, 3),
            "stats": batcher.stats.as_dict(),
        }

    @app.post("/score")
    async def score(request: Request):
        await authorize(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (JSON_TYPE, SAFETENSORS_TYPE):
            await drain(request)
            raise HTTPException(415, f"content type {ctype or 'none'!r} is not supported; send {JSON_TYPE} "
                                     f"(PNG images) or {SAFETENSORS_TYPE} (safetensors)")
        body = await read_body(request)
        try:
            parsed = await asyncio.to_thread(decode_request, body, ctype, max_images=options.max_batch,
                                             max_pixels=options.max_image_pixels)
        except ProtocolError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except (TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
            # a body shaped in a way the checks above did not foresee is still the client's error
            return JSONResponse({"error": f"malformed request ({type(e).__name__}: {e})"}, status_code=400)
        del body
        try:
            return await batcher.submit(parsed)
        except RewardFailed as e:
            return JSONResponse({"error": f"reward raised {e}"}, status_code=500)

    return app


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
    import uvicorn

    from alignrl.components import as_dict
    from alignrl.rewards.base import WeightedReward

    options = ServeOptions.from_config(as_dict(cfg.get("serve")))
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
            say(f"warning: listening on {options.host} with no token: anyone who reaches port {port} can use "
                f"this reward; set serve.token=<secret> (or {TOKEN_ENV})")
    hint = " and the same token (reward.remote.token or ALIGNRL_REWARD_TOKEN)" if options.token else ""
    say(f"point a client at it: alignrl train reward=remote reward.remote.url={url}{hint}")
    config = uvicorn.Config(create_app(reward, options), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


@contextmanager
def serve_in_background(reward, **options):
    """Serve ``reward`` from a thread of this process on a free loopback port; yields the URL.

    For notebooks, benchmarks and tests: ``with serve_in_background(r) as url: RemoteReward(url=url)``.
    """
    import threading
    import time

    import uvicorn

    opts = ServeOptions(**{"port": 0, **options})
    sock = bind_socket(opts.host, opts.port)
    server = uvicorn.Server(uvicorn.Config(create_app(reward, opts), log_level="critical", access_log=False))
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
