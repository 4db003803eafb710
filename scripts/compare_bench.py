"""A before/after table of two `treeflash bench` runs: per-stage ms per round, tau, tokens/s, speedups.

Reads each run's summary.csv (the pooled "all" rows) and writes Markdown.

    python scripts/compare_bench.py BEFORE_DIR AFTER_DIR [OUT.md] [--title TEXT]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from treeflash.decoding import STAGES as ALL_STAGES

STAGES = tuple(s for s in ALL_STAGES if s != "prefill")  # prefill is per generation, not per round


def load(run: Path) -> dict[tuple[str, int, int], dict]:
    path = run / "summary.csv"
    if not path.exists():
        raise SystemExit(f"{path} does not exist; pass the --out folder of a finished `treeflash bench` run")
    with path.open() as f:
        # summary.csv files written before n-gram lookup have no lookup column: all their variants ran without
        return {(r["method"], int(r["budget"]), int(r.get("lookup") or 0)): r for r in csv.DictReader(f)
                if r["dataset"] == "all"}


def _num(row: dict, key: str) -> float | None:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else None


def _cell(before: float | None, after: float | None, digits: int = 1) -> str:
    if before is None and after is None:
        return "–"
    if before is None or after is None:
        return f"{before if before is not None else '–'} / {after if after is not None else '–'}"
    return f"{before:.{digits}f} → **{after:.{digits}f}**"


def table(before: dict, after: dict) -> str:
    head = ["variant", *STAGES, "round (ms)", "tau", "tokens/s", "vs `ar`", "vs HF `generate()`", "same as `ar`"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in [k for k in after if k in before]:
        b, a = before[key], after[key]
        method, budget, lookup = key
        name = method + (f"@{budget}" if method in ("ddtree", "treeflash") else "") + (f"+lookup{lookup}" if lookup else "")
        stage_cells, rounds = [], []
        for row in (b, a):
            stages = [_num(row, f"{s}_ms_per_round") for s in STAGES]
            rounds.append(sum(s for s in stages if s) if any(stages) else None)
        for s in STAGES:
            sb, sa = _num(b, f"{s}_ms_per_round"), _num(a, f"{s}_ms_per_round")
            stage_cells.append("–" if not sb and not sa else _cell(sb, sa))
        lines.append("| " + " | ".join([
            f"`{name}`", *stage_cells, _cell(*rounds),
            _cell(_num(b, "tau"), _num(a, "tau"), 2),
            _cell(_num(b, "tokens_per_second"), _num(a, "tokens_per_second")),
            _cell(_num(b, "speedup_vs_ar"), _num(a, "speedup_vs_ar"), 2),
            _cell(_num(b, "speedup_vs_hf_generate"), _num(a, "speedup_vs_hf_generate"), 2),
            f"{float(a['agreement_with_ar']):.0%}" if a.get("agreement_with_ar") else "–",
        ]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="the --out folder of the first `treeflash bench` run")
    parser.add_argument("after", type=Path, help="the --out folder of the second")
    parser.add_argument("out", nargs="?", type=Path, help="Markdown file to write (default: only print)")
    parser.add_argument("--title", default="Before → after", help="the line above the table")
    args = parser.parse_args()
    text = f"{args.title}\n\nPer-stage times are ms per round (see docs/benchmarking.md); cells read before → after.\n\n"
    text += table(load(args.before), load(args.after))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
