"""``vlm_judge``: a vision-language model behind any OpenAI-compatible chat-completions endpoint (vLLM, sglang,
a hosted API) judges each image; the reward is the number after the last ``Final Score:`` divided by
``max_score``.

    alignrl train reward=vlm_judge reward.vlm_judge.url=http://127.0.0.1:30000/v1 reward.vlm_judge.model=<name>

Each image goes as a ``data:image/png;base64,...`` ``image_url`` content part, followed by the text of
``prompt_template`` with ``{prompt}`` replaced by the generation prompt. The answer is parsed with
``SCORE_PATTERN`` (case-insensitive): ``Final Score`` then ``:`` then a number, markdown ``**`` around either
side tolerated (``Final Score: 4``, ``**Final Score:** 4.5``); the last match wins. A number outside
[0, max_score] counts as unparsed.

A failed request (connection error, timeout, 5xx, malformed body) or an unparseable answer is not fatal: it
gives NaN for that sample (the trainer drops NaN samples) and is counted in ``info`` (``failures``,
``unparsed``); the first failure, and any batch where every request fails, is reported on stderr. HTTP 401,
403 and 404 say the key, model or URL is wrong for every sample, so they stop the run with a RewardError.
Requests run on ``max_concurrency`` threads; ``timeout`` is per request. ``api_key`` defaults to the env
``ALIGNRL_VLM_API_KEY``, then ``OPENAI_API_KEY``.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from alignrl.errors import ConfigError, RewardError
from alignrl.rewards.base import Reward, register_reward
from alignrl.rewards.jpeg import to_uint8
from alignrl.rewards.protocol import encode_png

SCORE_PATTERN = re.compile(r"final\s+score\s*\**\s*[:：]\s*\**\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)

DEFAULT_TEMPLATE = (
    "You are an expert judge of text-to-image generation. Look at the image and judge how well it matches "
    "the prompt and how good it looks (composition, detail, artifacts).\n"
    "Prompt: \"{prompt}\"\n"
    "Explain your judgement briefly, then end your answer with one line of the form\n"
    "Final Score: <x>\n"
    "where <x> is a number from 1 (poor) to 5 (excellent)."
)


def parse_score(text: str) -> float | None:
    """The number after the last ``Final Score:`` in ``text``, or None."""
    matches = SCORE_PATTERN.findall(text or "")
    return float(matches[-1]) if matches else None


# answers that say the configuration is wrong, not that one request failed
PERMANENT = {401: "check reward.vlm_judge.api_key or ALIGNRL_VLM_API_KEY", 403: "the key may not use this model",
             404: "check reward.vlm_judge.url (the API base, e.g. .../v1) and reward.vlm_judge.model"}


@register_reward("vlm_judge")
class VLMJudge(Reward):
    def __init__(self, url: str | None = None, model: str | None = None, api_key: str | None = None,
                 prompt_template: str = DEFAULT_TEMPLATE, max_score: float = 5.0, max_concurrency: int = 8,
                 timeout: float = 60.0, max_tokens: int = 512, temperature: float = 0.0):
        import httpx

        if not url:
            raise ConfigError("reward 'vlm_judge' needs the endpoint: reward.vlm_judge.url=http://127.0.0.1:30000/v1")
        if not model:
            raise ConfigError("reward 'vlm_judge' needs reward.vlm_judge.model=<served model name> "
                              "(the server lists them at <url>/models)")
        base = str(url).rstrip("/").removesuffix("/chat/completions")
        if not base.startswith(("http://", "https://")):
            raise ConfigError(f"reward.vlm_judge.url={url!r} is not an http(s) URL; use e.g. http://127.0.0.1:30000/v1")
        try:
            self.max_score, self.timeout = float(max_score), float(timeout)
            self.max_concurrency, self.max_tokens = int(max_concurrency), int(max_tokens)
            self.temperature = float(temperature)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"reward.vlm_judge: numeric option is not a number ({e})") from None
        if self.max_score <= 0 or self.timeout <= 0 or self.max_concurrency < 1 or self.max_tokens < 1:
            raise ConfigError("reward.vlm_judge: max_score and timeout must be > 0, "
                              "max_concurrency and max_tokens >= 1")
        self.model, self.prompt_template = str(model), str(prompt_template)
        api_key = api_key or os.environ.get("ALIGNRL_VLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.endpoint = base + "/chat/completions"
        self._client = httpx.Client(timeout=self.timeout, headers=headers,
                                    limits=httpx.Limits(max_connections=self.max_concurrency))
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="alignrl-vlm")
        self._reported = False

    def _messages(self, image, prompt: str) -> list[dict]:
        text = self.prompt_template.replace("{prompt}", prompt)
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encode_png(image)}},
            {"type": "text", "text": text},
        ]}]

    def _judge(self, image, prompt: str) -> tuple[float, str, str]:
        """(score in [0, 1] or NaN, 'ok' | 'failed' | 'unparsed', detail)."""
        import httpx

        payload = {"model": self.model, "messages": self._messages(image, prompt),
                   "max_tokens": self.max_tokens, "temperature": self.temperature}
        try:
            r = self._client.post(self.endpoint, json=payload)
        except httpx.HTTPError as e:
            return math.nan, "failed", f"{type(e).__name__}: {e}"
        if r.status_code in PERMANENT:  # the same for every sample: stop instead of training on nothing
            raise RewardError(f"vlm_judge at {self.endpoint} answered HTTP {r.status_code} "
                              f"({PERMANENT[r.status_code]}): {r.text.strip()[:200]}")
        if r.status_code != 200:
            return math.nan, "failed", f"HTTP {r.status_code}: {r.text.strip()[:200]}"
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return math.nan, "failed", f"not a chat-completions answer: {r.text.strip()[:200]}"
        if isinstance(content, list):  # some servers answer in content parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        value = parse_score(str(content or ""))
        if value is None or not 0.0 <= value <= self.max_score:
            return math.nan, "unparsed", f"no Final Score in [0, {self.max_score:g}] in: {str(content)[-200:]!r}"
        return value / self.max_score, "ok", ""

    def __call__(self, images, prompts, metadata):
        t0 = time.perf_counter()
        results = list(self._pool.map(self._judge, to_uint8(images), prompts))
        scores = np.array([r[0] for r in results], dtype=np.float64)
        failures = sum(r[1] == "failed" for r in results)
        unparsed = sum(r[1] == "unparsed" for r in results)
        problems = [r[2] for r in results if r[1] != "ok"]
        if problems and (not self._reported or failures + unparsed == len(results)):
            self._reported = True
            print(f"alignrl: warning: vlm_judge at {self.endpoint}: {failures} failed and {unparsed} unparsed of "
                  f"{len(results)} (scored NaN, dropped); first: {problems[0]}", file=sys.stderr, flush=True)
        return scores, {"failures": failures, "unparsed": unparsed, "request_s": time.perf_counter() - t0}

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()
