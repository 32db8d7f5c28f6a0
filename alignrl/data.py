"""Prompt sets: plain text (one prompt per line) or JSON lines (a ``prompt`` field; the other fields
are the prompt's metadata, e.g. GenEval's ``tag``/``include``), or a built-in set (``builtin:<name>``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from alignrl.errors import ConfigError


def builtin_prompt_sets() -> list[str]:
    return sorted(p.name.rsplit(".", 1)[0] for p in resources.files("alignrl.prompts").iterdir()
                  if p.name.endswith((".txt", ".jsonl")))


@dataclass
class PromptSet:
    prompts: list[str]
    metadata: list[dict]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def load(cls, spec: str, what: str = "data.train") -> "PromptSet":
        if spec is None or str(spec).strip() in ("", "???"):
            raise ConfigError(f"{what} is not set; pass {what}=<prompt file (.txt or .jsonl)>")
        spec = str(spec)
        if spec.startswith("builtin:"):
            name = spec.split(":", 1)[1]
            matches = [p for p in resources.files("alignrl.prompts").iterdir()
                       if p.name.rsplit(".", 1)[0] == name]
            if not matches:
                raise ConfigError(f"unknown built-in prompt set '{name}' in {what}; "
                                  f"available: {', '.join(builtin_prompt_sets())}")
            return cls._parse(matches[0].read_text(encoding="utf-8"), matches[0].name, spec, what)
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt file not found for {what}: '{spec}' "
                              f"(give a .txt/.jsonl path, or builtin:<{'|'.join(builtin_prompt_sets())}>)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompt file '{spec}' ({what}) is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                              f"offset {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"cannot read prompt file '{spec}' ({what}): {e.strerror}") from None
        return cls._parse(text, path.name, str(path), what)

    @classmethod
    def _parse(cls, text: str, name: str, source: str, what: str) -> "PromptSet":
        prompts, metadata = [], []
        if name.endswith(".jsonl"):
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or "prompt" not in row:
                    raise ConfigError(f"{source}:{lineno}: each JSON line needs a \"prompt\" field")
                prompts.append(str(row.pop("prompt")))
                metadata.append(row)
        else:
            for line in text.splitlines():
                if line.strip():
                    prompts.append(line.strip())
                    metadata.append({})
        if not prompts:
            raise ConfigError(f"{what}: '{source}' holds no prompts")
        return cls(prompts, metadata, source)


def load_eval_sets(spec, what: str = "data.eval") -> dict[str, PromptSet]:
    """``data.eval`` as named prompt sets: one file (``{"": set}``, metrics under ``eval/``) or a mapping
    ``{held_out: ..., in_dist: ...}`` (metrics under ``eval/<name>/``). Empty: no evaluation."""
    from omegaconf import DictConfig

    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {}
    if isinstance(spec, (dict, DictConfig)):
        sets = {}
        for name, sub in spec.items():
            if not str(name).isidentifier():
                raise ConfigError(f"{what}.{name}: eval set names must be plain words (letters, digits, _)")
            if sub is not None:
                sets[str(name)] = PromptSet.load(sub, f"{what}.{name}")
        return sets
    return {"": PromptSet.load(spec, what)}


def eval_prefix(name: str) -> str:
    """Where an eval set's metrics go: ``eval`` for the only set, ``eval/<name>`` for a named one."""
    return f"eval/{name}" if name else "eval"

