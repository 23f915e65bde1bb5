"""Write the small synthetic text data files in ``assets/text/`` that the tiny configs train on.

Every file comes from :func:`mmalign.data.synthetic.addition_rows` with a fixed seed, so the output is
byte-for-byte reproducible: ``tests/test_configs.py`` regenerates the files into a temporary directory and
compares them with the committed ones (``--check`` does the same from the command line).

Files (the task: ``add: 3 5 =`` → `` 8``; wrong answers are off by 1–3):

- ``pairs.jsonl`` / ``pairs_eval.jsonl``: ``prompt/chosen/rejected`` (DPO, SimPO, reward model);
- ``pairs_chat.jsonl``: the same in TRL's conversational form (user/assistant messages, chat template);
- ``unpaired.jsonl``: ``prompt/completion/label``, alternating desirable/undesirable (KTO, BCO);
- ``ranked.jsonl``: ``prompt/completions/ranking`` with 4 candidates ranked by |error| (Plackett–Luce);
- ``sft.jsonl``: ``prompt/completion`` with the correct sum (the SFT stage);
- ``forget.jsonl`` / ``retain.jsonl``: SFT rows split by difficulty — sums *with* a carry are the set to
  unlearn, sums without one the set whose utility must be kept (NPO/SimNPO + retain NLL).

Usage::

    python scripts/make_text_assets.py            # (re)write assets/text/
    python scripts/make_text_assets.py --check    # exit 1 if the committed files are stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from mmalign.data.synthetic import addition_rows, write_jsonl  # noqa: E402

DEFAULT_OUT = REPO / "assets" / "text"


def _split_by_difficulty(n_each: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``n_each`` carry rows (to forget) and ``n_each`` no-carry rows (to retain), in generation order."""
    rows = addition_rows(8 * n_each, format="sft", seed=seed)
    forget = [r for r in rows if r["difficulty"] == 1][:n_each]
    retain = [r for r in rows if r["difficulty"] == 0][:n_each]
    if len(forget) < n_each or len(retain) < n_each:  # cannot happen for seed 6; guards a changed generator
        raise RuntimeError(f"seed {seed} gave too few rows of one difficulty; raise the pool size")
    for r in forget:
        r["source"] = "synthetic/addition/forget"
    for r in retain:
        r["source"] = "synthetic/addition/retain"
    return forget, retain


def build(out: Path) -> list[Path]:
    """Write every asset file into ``out``; returns the paths written."""
    forget, retain = _split_by_difficulty(32, seed=6)
    pairs = addition_rows(64, format="pairs", seed=1)
    files = {
        "pairs.jsonl": pairs,
        # configs/text/tiny_auto_pairs_curriculum.yaml: pairs.jsonl split by difficulty (0: no carry, 1: carry)
        "pairs_easy.jsonl": [r for r in pairs if r["difficulty"] == 0],
        "pairs_hard.jsonl": [r for r in pairs if r["difficulty"] == 1],
        "pairs_eval.jsonl": addition_rows(16, format="pairs", seed=101),
        "pairs_chat.jsonl": addition_rows(32, format="pairs", conversational=True, seed=2),
        "unpaired.jsonl": addition_rows(64, format="unpaired", seed=3),
        "ranked.jsonl": addition_rows(32, format="ranked", seed=4, num_candidates=4),
        "sft.jsonl": addition_rows(64, format="sft", seed=5),
        "forget.jsonl": forget,
        "retain.jsonl": retain,
    }
    return [write_jsonl(rows, out / name) for name, rows in files.items()]


def stale_files(out: Path = DEFAULT_OUT) -> list[str]:
    """Names of asset files that are missing from ``out`` or differ from what :func:`build` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(Path(tmp))
        return [p.name for p in fresh
                if not (out / p.name).is_file() or not filecmp.cmp(p, out / p.name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: assets/text)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        if stale:
            print(f"stale or missing in {args.out}: {', '.join(stale)}; run python scripts/make_text_assets.py")
            return 1
        print(f"{args.out}: up to date")
        return 0
    for path in build(args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
