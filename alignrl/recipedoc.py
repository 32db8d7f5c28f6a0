"""Recipes against their references: the data behind ``docs/recipes.md``.

``docs/reference_values/<method>.yaml`` records, for each paper recipe, the reference implementation's value of
every result-changing setting (in alignrl's units), with its source (repo, commit, file, line). This module
resolves each recipe, compares, and renders one table per method. A value that differs must carry its reason
in the recipe (``differs: {<key>: <why>}``, inherited from bases like any value); a difference without one is a
*problem*, which ``tests/test_recipe_doc.py`` fails on, as it fails when ``docs/recipes.md`` is stale.
Regenerate with ``python scripts/gen_recipes_doc.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
VALUES_DIR = ROOT / "docs" / "reference_values"
DOC_PATH = ROOT / "docs" / "recipes.md"
SET_LIKE = ("trainer.lora.target_modules",)  # compared as sets: the order of module names means nothing
# keys whose null means "the value of another key" (compared by what they resolve to)
INHERITS = {"sampler.eval_guidance_scale": "sampler.guidance_scale"}


@dataclass
class Row:
    key: str
    ours: object
    ref: object
    source: str
    note: str = ""
    why: str = ""

    @property
    def status(self) -> str:
        if same(self.key, self.ours, self.ref):
            return "same"
        return "kept" if self.why else "DIFFERS"


@dataclass
class RecipeCheck:
    recipe: str
    method: str
    run: str
    rows: list[Row] = field(default_factory=list)
    unmapped: list[dict] = field(default_factory=list)


def same(key: str, ours, ref) -> bool:
    if isinstance(ours, (list, tuple)) and isinstance(ref, (list, tuple)):
        if key in SET_LIKE:
            return sorted(map(str, ours)) == sorted(map(str, ref))
        return len(ours) == len(ref) and all(same(key, a, b) for a, b in zip(ours, ref))
    if isinstance(ours, bool) or isinstance(ref, bool):
        return ours is ref
    if isinstance(ours, (int, float)) and isinstance(ref, (int, float)):
        return math.isclose(float(ours), float(ref), rel_tol=1e-6, abs_tol=0.0)
    return ours == ref


def load_values(values_dir: Path = VALUES_DIR) -> dict[str, dict]:
    """method -> its file's content, for every docs/reference_values/*.yaml."""
    out = {}
    for path in sorted(values_dir.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or "recipes" not in data:
            raise ValueError(f"{path}: not a reference-values file (needs method, reference, recipes)")
        out[path.stem] = data
    return out


def check_recipe(recipe: str, method: str, entry: dict, overrides: tuple[str, ...] = ()) -> RecipeCheck:
    from alignrl.config import compose

    cfg = compose([f"recipe={recipe}", *overrides])
    differs = cfg.get("differs")
    differs = OmegaConf.to_container(differs, resolve=False) if differs is not None else {}
    res = RecipeCheck(recipe, method, str(entry.get("run", "")))
    for key, val in (entry.get("values") or {}).items():
        ours = OmegaConf.select(cfg, key, default="(not set)")
        if ours is None and key in INHERITS:
            ours = OmegaConf.select(cfg, INHERITS[key])
        if ours == "(not set)" and key.startswith("reward.") and key.endswith(".weight"):
            ours = 0.0  # a reward the recipe does not train has weight 0
        if OmegaConf.is_config(ours):
            ours = OmegaConf.to_container(ours, resolve=False)
        res.rows.append(Row(key, ours, val.get("ref"), str(val.get("source", "")), str(val.get("note", "") or ""),
                            str(differs.get(key, "") or "")))
    res.unmapped = [dict(u, why=str(differs.get(u.get("key", ""), "") or "")) for u in entry.get("unmapped") or []]
    return res


def check_all(values_dir: Path = VALUES_DIR) -> tuple[dict[str, dict], list[RecipeCheck]]:
    values = load_values(values_dir)
    checks = [check_recipe(recipe, method, entry)
              for method, data in values.items() for recipe, entry in (data.get("recipes") or {}).items()]
    return values, checks


def problems(checks: list[RecipeCheck]) -> list[str]:
    out = []
    for c in checks:
        for r in c.rows:
            if r.status == "DIFFERS":
                out.append(f"{c.recipe}: {r.key} is {fmt(r.ours)}, the reference's is {fmt(r.ref)} ({r.source}); "
                           f"match it or say why in the recipe's differs: {{{r.key}: ...}}")
    return out


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render(values: dict[str, dict], checks: list[RecipeCheck]) -> str:
    by_method: dict[str, list[RecipeCheck]] = {}
    for c in checks:
        by_method.setdefault(c.method, []).append(c)
    lines = [
        "# Recipes against their references",
        "",
        "<!-- generated by scripts/gen_recipes_doc.py from docs/reference_values/*.yaml and the recipes; "
        "do not edit by hand: tests/test_recipe_doc.py fails when this file is stale -->",
        "",
        "Each paper recipe resolved (`alignrl train recipe=<name> --cfg job`) and compared with the value its "
        "reference implementation uses for the same run, converted to alignrl's units. Status: **same**; "
        "**kept** (alignrl differs on purpose: the reason is the recipe's `differs:` entry, shown); "
        "**DIFFERS** (a difference with no reason: the test fails on it). Settings of the reference that no "
        "alignrl key expresses are listed under each table.",
        "",
        "| recipe | reference run | values | same | kept | not expressible |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        n_same = sum(r.status == "same" for r in c.rows)
        n_kept = sum(r.status == "kept" for r in c.rows)
        lines.append(f"| [`{c.recipe}`](#{c.recipe}) | {_cell(c.run)} | {len(c.rows)} | {n_same} | {n_kept} | "
                     f"{len(c.unmapped)} |")
    for method, cs in by_method.items():
        ref = values[method].get("reference") or {}
        lines += ["", f"## {method}", "",
                  f"Reference: `{ref.get('repo', '?')}` at `{str(ref.get('commit', '?'))[:12]}`"
                  + (f"; {ref['paper']}" if ref.get("paper") else "") + "."]
        for c in cs:
            lines += ["", f"### {c.recipe}", "", f"Reference run: {_cell(c.run)}", "",
                      "| key | alignrl | reference | source | status |", "|---|---|---|---|---|"]
            for r in c.rows:
                status = r.status if r.status != "kept" else f"kept: {r.why}"
                src = r.source + (f" ({r.note})" if r.note else "")
                lines.append(f"| `{r.key}` | {_cell(fmt(r.ours))} | {_cell(fmt(r.ref))} | {_cell(src)} | "
                             f"{_cell(status)} |")
            if c.unmapped:
                lines += ["", "Not expressible in alignrl's settings:", ""]
                for u in c.unmapped:
                    why = f" {u['why']}" if u.get("why") else ""
                    lines.append(f"- {_cell(u.get('what', ''))}: {_cell(fmt(u.get('ref', '')))} "
                                 f"({_cell(u.get('source', ''))}).{_cell(why)}")
    return "\n".join(lines) + "\n"


def build() -> tuple[str, list[str]]:
    values, checks = check_all()
    return render(values, checks), problems(checks)
