"""OCR reward (Flow-GRPO's text-rendering task): PP-OCR reads the image, the prompt's quoted text is the target.

Recognition runs through ``rapidocr-onnxruntime``, whose wheel ships the PP-OCRv4 detection and
recognition ONNX models (no download). Texts are compared after lower-casing and removing all
whitespace: 1 if the target is a substring of what was read, else
``1 - min(levenshtein(read, target), len(target)) / len(target)``.

Targets: every span in double quotes (``"..."`` or curly ``“...”``); if there is none, spans in single
quotes (``'...'`` or ``‘...’``) whose quote marks are not inside a word, so apostrophes (``cat's``)
are not taken for quotes. Several targets score their mean. A prompt without a target scores NaN
(the sample is dropped) and is counted in ``info['no_target']``.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np

from alignrl.errors import ConfigError
from alignrl.rewards.base import Reward, register_reward
from alignrl.rewards.clip import _brief, as_flag
from alignrl.rewards.jpeg import to_uint8

_DOUBLE = (re.compile(r'"([^"]*)"'), re.compile("\u201c([^\u201c\u201d]*)\u201d"))
_SINGLE = (re.compile(r"(?<!\w)'(.*?)'(?!\w)"), re.compile("(?<!\\w)\u2018(.*?)\u2019(?!\\w)"))


def normalise(text: str) -> str:
    """Lower-case with all whitespace removed."""
    return "".join(text.lower().split())


def extract_targets(prompt: str) -> list[str]:
    """The quoted spans of ``prompt`` (double quotes first, single quotes only if there are none)."""
    for patterns in (_DOUBLE, _SINGLE):
        found = sorted((m.start(), m.group(1)) for pat in patterns for m in pat.finditer(prompt))
        spans = [s.strip() for _, s in found if normalise(s)]
        if spans:
            return spans
    return []


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_match(recognised: str, target: str) -> float:
    """1 if the normalised target occurs in the normalised recognised text, else 1 - clipped distance / length."""
    t, r = normalise(target), normalise(recognised)
    if not t:
        raise ValueError("empty OCR target")
    if t in r:
        return 1.0
    return 1.0 - min(levenshtein(r, t), len(t)) / len(t)


@register_reward("ocr")
class OcrReward(Reward):
    """Options: ``use_gpu`` (onnxruntime CUDA provider; needs onnxruntime-gpu, default CPU),
    ``min_confidence`` (drop recognised lines below this PP-OCR confidence), ``threads`` (onnxruntime
    intra-op threads; 0 = its default)."""

    per_sample_keys = ("exact",)

    def __init__(self, use_gpu: Any = False, min_confidence: float = 0.5, threads: int = 0):
        self.use_gpu = as_flag(use_gpu, "ocr", "use_gpu")
        try:
            self.min_confidence = float(min_confidence)
        except (TypeError, ValueError):
            raise ConfigError(f"reward.ocr.min_confidence={min_confidence!r} is not a number; use e.g. 0.5") from None
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ConfigError(f"reward.ocr.min_confidence={min_confidence} must be within [0, 1]")
        try:
            threads = int(threads)
        except (TypeError, ValueError):
            threads = -1
        if threads < 0:
            raise ConfigError(f"reward.ocr.threads={threads!r} must be 0 (onnxruntime default) or a positive integer")
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise ConfigError("reward 'ocr' needs rapidocr-onnxruntime: pip install 'alignrl[ocr]'") from None
        if self.use_gpu:
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise ConfigError("reward.ocr.use_gpu=true but onnxruntime has no CUDA provider; "
                                  "install onnxruntime-gpu or set reward.ocr.use_gpu=false")
        kwargs: dict[str, Any] = {"text_score": self.min_confidence, "print_verbose": False}
        for part in ("det", "cls", "rec"):
            kwargs[f"{part}_use_cuda"] = self.use_gpu
        if threads:
            kwargs["intra_op_num_threads"] = threads
        try:
            self.engine = RapidOCR(**kwargs)
        except Exception as e:  # a broken install: name the package to reinstall
            raise ConfigError(f"reward 'ocr' cannot start PP-OCR ({_brief(e)}); reinstall with pip install 'alignrl[ocr]'") from e
        self._lock = threading.Lock()  # the engine keeps per-call state; rewards run on a worker thread

    def read(self, image: np.ndarray) -> str:
        """All text recognised in an (H, W, 3) RGB uint8 image, lines in reading order joined by spaces."""
        bgr = np.ascontiguousarray(image[..., ::-1])
        with self._lock:
            result, _ = self.engine(bgr)
        return " ".join(str(line[1]) for line in (result or []))

    def __call__(self, images, prompts, metadata):
        arrays = to_uint8(images)
        scores = np.full(len(prompts), np.nan, dtype=np.float64)
        exact = np.full(len(prompts), np.nan, dtype=np.float64)
        no_target = 0
        for i, (image, prompt) in enumerate(zip(arrays, prompts)):
            targets = extract_targets(prompt)
            if not targets:
                no_target += 1
                continue
            text = self.read(image)
            per_target = [text_match(text, t) for t in targets]
            scores[i] = float(np.mean(per_target))
            exact[i] = float(all(s == 1.0 for s in per_target))
        scored = scores[np.isfinite(scores)]
        info = {
            "mean": float(scored.mean()) if scored.size else float("nan"),
            "exact": float(exact[np.isfinite(exact)].mean()) if scored.size else float("nan"),
            "no_target": no_target,
            "per_sample": {"exact": exact},
        }
        return scores, info
