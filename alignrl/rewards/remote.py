"""``remote``: scores from an ``alignrl serve-reward`` server (a reward in its own environment or on its own GPU).

    alignrl serve-reward reward=shapes_geneval serve.port=8000          # on the reward machine/environment
    alignrl train reward=remote reward.remote.url=http://127.0.0.1:8000  # the trainer

Options: ``url`` (required), ``token`` or ``token_file`` (a file holding it, kept out of ``ps``; default: env
``ALIGNRL_REWARD_TOKEN``), ``timeout`` (seconds per request), ``retries`` (extra tries after the first, for
connection errors, timeouts, 5xx and 429; waits ``backoff * 2**k`` seconds, at least any ``Retry-After``),
``format`` (``png``: uint8-exact, small; ``safetensors``: exact float32), ``batch_size`` (images per request;
default: the server's max_batch; never more than its ``max_request_pixels`` take), ``check_on_start`` (GET
/health and /info in the constructor, so a dead server or a wrong token fails before any model loads), ``video``
(true: send whole clips (B, F, 3, H, W), as safetensors, to a server whose reward takes videos; false: a video
backbone's frames go as images, scored frame by frame on this side's ``frames:`` reduction). 4xx answers are not
retried. The protocol is in ``alignrl.rewards.protocol``.

``info`` holds ``per_sample`` (the server's per-reward scores under their names, and its per-sample
metrics), the server's batch numbers averaged over requests, and ``requests`` / ``request_s``.
"""

from __future__ import annotations

import os
import random
import socket
import time

import numpy as np

from alignrl.errors import ConfigError, RewardError
from alignrl.rewards.base import Reward, register_reward
from alignrl.rewards.protocol import (
    FORMATS, PROTOCOL_VERSION, TOKEN_ENV, ProtocolError, decode_response, encode_request, read_token_file,
)

MAX_WAIT_S = 60.0
FIX_SERVER = "start one with `alignrl serve-reward reward=<name> serve.port=<port>` or fix reward.remote.url"


def _error_text(response) -> str:
    """The server's ``{"error": ...}`` message, else the start of the body."""
    try:
        obj = response.json()
    except ValueError:
        obj = None
    if isinstance(obj, dict) and "error" in obj:
        return str(obj["error"])
    return response.text.strip().replace("\n", " ")[:300] or response.reason_phrase


@register_reward("remote")
class RemoteReward(Reward):
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 0.5, format: str = "png", batch_size: int | None = None,
                 check_on_start: bool = True, token_file: str | None = None, video: bool = False):
        import httpx

        # video: the server's reward takes whole clips (B, F, 3, H, W; its own video or frame-wise rewards); else
        # the client's WeightedReward sends video frames as images
        self.video = bool(video)
        if self.video and format != "safetensors":
            raise ConfigError("reward.remote.video=true sends clips, which travel as safetensors: set "
                              "reward.remote.format=safetensors")

        if not url:
            raise ConfigError("reward 'remote' needs the server's address: reward.remote.url=http://127.0.0.1:8000 "
                              "(start a server with `alignrl serve-reward reward=<name>`)")
        self.url = str(url).rstrip("/")
        try:
            parsed = httpx.URL(self.url)
        except httpx.InvalidURL as e:
            raise ConfigError(f"reward.remote.url={self.url!r} is not a URL ({e}); use http://HOST:PORT") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"reward.remote.url={self.url!r} is not an http(s) URL; use http://HOST:PORT")
        if format not in FORMATS:
            raise ConfigError(f"reward.remote.format={format!r} is not known; use png or safetensors")
        try:
            self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
            self.batch_size = int(batch_size) if batch_size not in (None, 0) else None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"reward.remote: timeout, retries, backoff, batch_size must be numbers ({e})") from None
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0 or (self.batch_size or 1) < 1:
            raise ConfigError("reward.remote: timeout must be > 0, retries and backoff >= 0, batch_size >= 1")
        self.format = format
        if token not in (None, "") and token_file not in (None, ""):
            raise ConfigError("set one of reward.remote.token and reward.remote.token_file, not both")
        if token in (None, ""):
            token = read_token_file(token_file, "reward.remote.token_file") if token_file not in (None, "") \
                else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # TCP_NODELAY: a request body sent after its headers must not wait for the server's delayed ACK
        nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._client = httpx.Client(base_url=self.url, timeout=self.timeout, headers=headers, transport=nodelay)
        self.attempts = 0  # HTTP attempts made (tries, counting retries)
        self.server_info: dict | None = None
        self.per_sample_keys: tuple[str, ...] = ()
        if check_on_start:
            try:
                self.check()
            except BaseException:
                self._client.close()
                raise

    # ------------------------------------------------------------------------------------ http
    def _wait(self, attempt: int, retry_after: float | None) -> None:
        delay = self.backoff * (2 ** (attempt - 1)) * (1.0 + 0.1 * random.random())
        if retry_after is not None:
            delay = max(delay, retry_after)
        time.sleep(min(delay, MAX_WAIT_S))

    def _request(self, method: str, path: str, what: str, content: bytes | None = None,
                 content_type: str | None = None) -> dict:
        import httpx

        tries = self.retries + 1
        last, retry_after = "", None
        for attempt in range(tries):
            if attempt:
                self._wait(attempt, retry_after)
            retry_after = None
            self.attempts += 1
            try:
                response = self._client.request(method, path, content=content,
                                                headers={"content-type": content_type} if content_type else None)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:g} s (reward.remote.timeout)"
                continue
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            code = response.status_code
            if code == 429 or code >= 500:
                last = f"HTTP {code}: {_error_text(response)}"
                try:
                    retry_after = float(response.headers.get("retry-after", ""))
                except ValueError:
                    retry_after = None
                continue
            if code == 401:
                raise RewardError(f"reward server {self.url} refused the token (HTTP 401): set {TOKEN_ENV} or "
                                  "reward.remote.token_file (or reward.remote.token) to the server's token")
            if code == 413:
                raise RewardError(f"reward server {self.url} refused the request as too large (HTTP 413: "
                                  f"{_error_text(response)}); lower reward.remote.batch_size")
            if code >= 400:
                raise RewardError(f"reward server {self.url} rejected {what}: HTTP {code}: {_error_text(response)}")
            try:
                return response.json()
            except ValueError:
                raise RewardError(f"{self.url}{path} answered HTTP {code} with something other than JSON; "
                                  "is reward.remote.url an `alignrl serve-reward` server?") from None
        if "HTTP " in last:
            raise RewardError(f"reward server {self.url} failed {what} after {tries} tries: {last}")
        raise RewardError(f"no reward server answered at {self.url} ({what}) after {tries} tries ({last}); "
                          f"{FIX_SERVER}")

    def check(self) -> dict:
        """GET /health, then /info (checks the token and protocol); returns the server's info."""
        health = self._request("GET", "/health", "the health check")
        if not isinstance(health, dict) or health.get("status") != "ok":
            raise RewardError(f"{self.url}/health did not answer status ok; is it an `alignrl serve-reward` server?")
        info = self._request("GET", "/info", "the info request")
        if not isinstance(info, dict) or info.get("protocol") != PROTOCOL_VERSION:
            theirs = info.get("protocol") if isinstance(info, dict) else "?"
            raise RewardError(f"reward server {self.url} speaks protocol {theirs}, this client {PROTOCOL_VERSION}; "
                              "run the same alignrl version on both sides")
        max_batch = int(info.get("max_batch") or 0)
        if self.batch_size and max_batch and self.batch_size > max_batch:
            raise ConfigError(f"reward.remote.batch_size={self.batch_size} exceeds the server's max_batch={max_batch}; "
                              "lower it or restart the server with a larger serve.max_batch")
        if not self.batch_size and max_batch:
            self.batch_size = max_batch
        self.per_sample_keys = tuple(info.get("rewards") or ()) + tuple(info.get("per_sample_keys") or ())
        self.server_info = info
        return info

    def per_request(self, size, wanted: int, frames: int = 1) -> int:
        """Images (or clips of ``frames`` frames) per request: ``wanted``, lowered to what the server's pixel
        limits take (from /info; they count every frame)."""
        info = self.server_info or {}
        height, width = (int(v) for v in size)
        per_image, per_request = info.get("max_image_pixels"), info.get("max_request_pixels")
        if per_image and height * width > per_image:
            raise RewardError(f"remote: images are {width}x{height}, over the server's serve.max_image_pixels="
                              f"{per_image}; send smaller images or raise the server's limit")
        if per_request and height * width:
            if frames * height * width > int(per_request):
                raise RewardError(f"remote: one clip of {frames} frames of {width}x{height} is over the server's "
                                  f"serve.max_request_pixels={per_request}; raise the server's limit")
            wanted = min(wanted, max(1, int(per_request) // (frames * height * width)))
        return wanted

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------------------------ scoring
    def __call__(self, images, prompts, metadata):
        n = len(prompts)
        metadata = list(metadata) if metadata else [{} for _ in range(n)]
        if images.shape[0] != n or len(metadata) != n:
            raise RewardError(f"remote: {images.shape[0]} images, {n} prompts, {len(metadata)} metadata")
        if n == 0:
            return np.zeros(0), {}
        if images.ndim == 5 and not self.video:
            raise RewardError("remote: got videos but reward.remote.video is false (the server scores images); set "
                              "video=true when the server's reward takes clips")
        step = self.per_request(images.shape[-2:], self.batch_size or n, images.shape[1] if images.ndim == 5 else 1)
        scores, per_sample, info_sums = [], {}, {}
        t0 = time.perf_counter()
        chunks = list(range(0, n, step))
        for start in chunks:
            sl = slice(start, min(start + step, n))
            m_planned = sl.stop - sl.start
            try:
                body, ctype = encode_request(images[sl], prompts[sl], metadata[sl], self.format)
            except (TypeError, ValueError) as e:
                raise RewardError(f"remote: cannot encode the request ({e}); metadata must be JSON-serializable") \
                    from None
            limit_mb = float((self.server_info or {}).get("max_request_mb") or 0)
            if limit_mb and len(body) > limit_mb * 2 ** 20:
                raise RewardError(f"remote: a request of {m_planned} images is {len(body) / 2 ** 20:.1f} MB, over the "
                                  f"server's serve.max_request_mb={limit_mb:g}; lower reward.remote.batch_size "
                                  "(or use format=png, or raise the server's limit)")
            answer = self._request("POST", "/score", "scoring", content=body, content_type=ctype)
            m = sl.stop - sl.start
            try:
                s, per_reward, extra, info = decode_response(answer, m)
            except ProtocolError as e:
                raise RewardError(f"reward server {self.url} sent an unexpected answer: {e}") from None
            scores.append(s)
            for key, arr in {**per_reward, **extra}.items():
                per_sample.setdefault(key, np.full(n, np.nan))[sl] = arr
            for k, v in info.items():
                info_sums.setdefault(k, []).append(v)
        info = {k: float(np.mean(v)) for k, v in info_sums.items()}
        info.update(requests=len(chunks), request_s=time.perf_counter() - t0, per_sample=per_sample)
        return np.concatenate(scores), info
