"""Write docs/recipes.md: every paper recipe against its reference implementation's values.

    python scripts/gen_recipes_doc.py            # writes docs/recipes.md, lists differences that have no reason
    python scripts/gen_recipes_doc.py --check    # writes nothing; exit 1 if the file is stale or a reason is missing

The reference values live in docs/reference_values/<method>.yaml (value, source: repo, commit, file, line); the
reasons for deliberate differences in each recipe's `differs:` map (alignrl/recipedoc.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alignrl.recipedoc import DOC_PATH, build  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/recipes.md is stale or a reason is missing")
    args = ap.parse_args()
    text, problems = build()
    for p in problems:
        print(f"problem: {p}")
    if args.check:
        stale = not DOC_PATH.exists() or DOC_PATH.read_text() != text
        if stale:
            print(f"{DOC_PATH} is stale: run python scripts/gen_recipes_doc.py")
        return 1 if stale or problems else 0
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH} ({len(problems)} difference(s) without a reason)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
