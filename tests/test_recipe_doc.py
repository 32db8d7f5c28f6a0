"""docs/recipes.md: every paper recipe's values against its reference implementation's (alignrl/recipedoc.py)."""

from __future__ import annotations

import pytest
import yaml

from alignrl import recipedoc
from alignrl.recipedoc import Row, check_recipe, problems, render, same


def test_docs_recipes_md_is_current_and_every_difference_has_a_reason():
    text, found = recipedoc.build()
    assert not found, "\n".join(found)
    assert recipedoc.DOC_PATH.read_text() == text, "docs/recipes.md is stale: run python scripts/gen_recipes_doc.py"


def test_every_reference_file_names_its_source_and_a_shipped_recipe():
    from alignrl.config import recipes_dir

    shipped = {p.stem for p in (recipes_dir() / "recipe").glob("*.yaml")}
    values = recipedoc.load_values()
    assert values, "no reference values"
    for method, data in values.items():
        ref = data["reference"]
        if any(entry.get("values") for entry in data["recipes"].values()):  # RankDPO: no code, no values
            assert "/" in ref["repo"] and len(str(ref["commit"])) == 40, method
        for recipe, entry in data["recipes"].items():
            assert recipe in shipped, f"{method}: {recipe} is not a shipped recipe"
            for key, val in entry["values"].items():
                assert "ref" in val and val.get("source"), f"{recipe}: {key} needs ref and source"


def test_comparison_rules():
    assert same("algorithm.lr", 3e-4, 0.0003)
    assert not same("algorithm.lr", 3e-4, 1e-4)
    assert same("trainer.lora.target_modules", ["a", "b"], ["b", "a"])  # a set
    assert not same("data.split_points", [0, 3], [3, 0])                 # a list keeps its order
    assert same("algorithm.global_std", True, True) and not same("algorithm.global_std", True, 1)
    assert same("trainer.mixed_precision", "fp16", "fp16") and not same("trainer.mixed_precision", "fp16", "bf16")


def test_a_difference_needs_a_reason_in_the_recipe():
    from alignrl.config import compose

    k = int(compose(["recipe=tiny_flowgrpo"]).algorithm.group_size)
    entry = {"run": "r", "values": {"algorithm.lr": {"ref": 1.0, "source": "cfg.py:1"},
                                    "algorithm.group_size": {"ref": k, "source": "cfg.py:2"}}}
    plain = check_recipe("tiny_flowgrpo", "flowgrpo", entry)
    statuses = {r.key: r.status for r in plain.rows}
    assert statuses == {"algorithm.lr": "DIFFERS", "algorithm.group_size": "same"}
    [msg] = problems([plain])
    assert "algorithm.lr" in msg and "differs" in msg
    kept = check_recipe("tiny_flowgrpo", "flowgrpo", entry,
                        ("+differs={algorithm.lr: 'a tiny model', algorithm.group_size: 'x'}",))
    assert {r.key: r.status for r in kept.rows} == {"algorithm.lr": "kept", "algorithm.group_size": "same"}
    assert problems([kept]) == []  # an inherited reason for a value that matches is not shown
    text = render({"flowgrpo": {"reference": {"repo": "o/n", "commit": "0" * 40}}}, [kept])
    assert "kept: a tiny model" in text and f"| `algorithm.group_size` | {k} | {k} |" in text


def test_a_malformed_values_file_is_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"method": "x"}))
    with pytest.raises(ValueError, match="not a reference-values file"):
        recipedoc.load_values(tmp_path)


def test_row_status_is_same_for_a_converted_float():
    assert Row("sampler.noise_level", 0.7, 0.7000000001, "s").status == "same"
