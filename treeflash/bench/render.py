"""Writing a benchmark's results: the runs and summaries as JSON, the summaries as CSV, and the Markdown
report (headline tables, where the time goes, acceptance lengths, checks, plots, analyses, machine, command)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

from ..decoding import STAGES
from .metrics import BASELINES, HF_GENERATE, Run, Summary, best_budgets, variant_label

RUNS_FILE, SUMMARY_FILE, REPORT_FILE, ANALYSIS_FILE = "runs.json", "summary.csv", "report.md", "analysis.json"


def round_floats(x, digits: int = 6):
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, digits)
    if isinstance(x, dict):
        return {k: round_floats(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [round_floats(v, digits) for v in x]
    return x


def write_runs(path: Path, meta: dict, runs: Sequence[Run], summaries: Sequence[Summary]) -> None:
    data = {"meta": meta, "runs": [round_floats(r.to_dict()) for r in runs],
            "summary": [round_floats(s.to_dict()) for s in summaries]}
    path.write_text(json.dumps(data, indent=1) + "\n")


SUMMARY_COLUMNS = ("dataset", "method", "budget", "lookup", "runs", "new_tokens", "seconds", "rounds", "tau",
                   "tokens_per_second", "seconds_per_token", "speedup_vs_ar", "speedup_vs_hf_generate",
                   "agreement_with_ar", "peak_memory_bytes", "peak_memory_delta_bytes")


def write_summary_csv(path: Path, summaries: Sequence[Summary]) -> None:
    """One row per (dataset, variant): the Summary fields, then `<stage>_ms_per_round` per stage
    (prefill_ms_per_round is per generation)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*SUMMARY_COLUMNS, *(f"{s}_ms_per_round" for s in STAGES)])
        for s in summaries:
            values = [round_floats(getattr(s, c)) for c in SUMMARY_COLUMNS]
            stages = [round_floats(s.stage_ms_per_round(stage), 3) if s.rounds is not None else None for stage in STAGES]
            writer.writerow(["" if v is None else v for v in (*values, *stages)])


def fmt(x, spec: str = ".2f", none: str = "–") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _mib(x) -> str:
    return fmt(None if x is None else x / 2**20, ".0f")


def write_report(path: Path, meta: dict, runs: Sequence[Run], summaries: Sequence[Summary],
                 plots: dict[str, str] | None = None, analysis: dict | None = None) -> None:
    """The Markdown report: headline tables, stage breakdown, checks, plots, analyses, machine, command."""
    config, machine = meta["config"], meta["machine"]
    threads = machine["torch_threads"]
    where = machine.get("gpu") or f"{machine['cpu']} ({threads} thread{'s' * (threads != 1)})"
    lines = [
        f"# treeflash bench: {meta['target']} on {where}",
        "",
        f"{meta['prompts']} prompts ({', '.join(f'{n} {d}' for d, n in meta['prompts_per_dataset'].items())}), "
        f"up to {config['max_new_tokens']} new tokens each, temperature {config['temperature']}"
        + (f" (seed {config['seed']})" if config["temperature"] > 0 else " (greedy)")
        + f", {meta['dtype']}. Drafter: {meta['drafter']}"
        + (f" ({meta['drafter_dtype']})" if meta.get("drafter_dtype") else "") + ". Every variant ran on every prompt, interleaved; "
        f"{config['warmup']} untimed warm-up generation(s) of each first. Started {meta['started']}, took "
        f"{meta['elapsed_seconds'] / 60:.1f} min.",
        "",
        "tau = mean tokens committed per round, bonus included; tokens/s = new tokens / wall seconds (prefill "
        "included), pooled over prompts; speedup = the baseline's seconds per token / the variant's. "
        "See docs/benchmarking.md.",
        "",
        "## Headline",
        "",
    ]
    best = best_budgets(summaries)
    for dataset in dict.fromkeys(s.dataset for s in summaries):
        lines += [f"### {dataset}", "",
                  "| variant | budget | prompts | new tokens | tau | tokens/s | speedup vs ar | speedup vs HF generate "
                  "| same output as ar |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in (s for s in summaries if s.dataset == dataset):
            mark = " **(best)**" if s.method in ("ddtree", "treeflash") and best[(dataset, s.series)] is s \
                and len(config["budgets"]) > 1 else ""
            agreement = "–" if s.agreement_with_ar is None else f"{100 * s.agreement_with_ar:.0f}%"
            lines.append(f"| {s.series}{mark} | {s.budget} | {s.runs} | {s.new_tokens} | {fmt(s.tau)} | "
                         f"{fmt(s.tokens_per_second, '.1f')} | {fmt(s.speedup_vs_ar)} | "
                         f"{fmt(s.speedup_vs_hf_generate)} | {agreement} |")
        lines.append("")

    pooled = [s for s in summaries if s.dataset == "all"] or list(summaries)
    scope = "all datasets pooled" if any(s.dataset == "all" for s in summaries) else pooled[0].dataset
    lines += [
        "## Where the time goes",
        "",
        f"Milliseconds per round ({scope}); prefill in milliseconds per generation. `draft`: the drafter's "
        "pass; `head`: TreeFlash's conditional passes (on a CPU, with the search that asks for their rows); `tree`: "
        "top-k tables, best-first search, mask; `verify`: the "
        "target's pass and token choice; `commit`: the walk, cache compaction, stop checks.",
        "",
        "| variant | rounds | " + " | ".join(STAGES) + " | round total | share in verify |",
        "|---|---|" + "---|" * len(STAGES) + "---|---|",
    ]
    for s in pooled:
        if s.rounds is None:
            continue
        per_round = {st: s.stage_ms_per_round(st) for st in STAGES}
        round_total = sum(v for st, v in per_round.items() if st != "prefill" and not math.isnan(v))
        share = per_round["verify"] / round_total if round_total else math.nan
        lines.append(f"| {s.label} | {s.rounds} | " + " | ".join(fmt(per_round[st], '.1f') for st in STAGES)
                     + f" | {fmt(round_total, '.1f')} | {fmt(100 * share, '.0f')}% |")
    lines += ["", "## Acceptance lengths", "",
              f"Share of rounds ({scope}) that accepted L drafted tokens (the bonus not counted).", "",
              "| variant | rounds | " + " | ".join(f"L={i}" for i in range(_longest(pooled))) + " |",
              "|---|---|" + "---|" * _longest(pooled)]
    for s in pooled:
        if s.acceptance_histogram is None or s.method == "ar":
            continue
        hist = s.acceptance_histogram + [0] * (_longest(pooled) - len(s.acceptance_histogram))
        lines.append(f"| {s.label} | {s.rounds} | " + " | ".join(f"{100 * c / s.rounds:.0f}%" for c in hist) + " |")

    lines += ["", "## Checks", ""]
    lines += _check_lines(runs, config)
    lines += ["", f"Peak memory ({meta['memory']}):", "",
              "| variant | peak MiB | added over the start MiB |", "|---|---|---|"]
    for s in pooled:
        lines.append(f"| {s.label} | {_mib(s.peak_memory_bytes)} | {_mib(s.peak_memory_delta_bytes)} |")

    if plots:
        lines += ["", "## Plots", ""]
        for title, file in plots.items():
            lines += [f"### {title}", "", f"![{title}]({file})", ""]
    if analysis:
        lines += ["", *_analysis_lines(analysis)]
    lines += ["", "## Machine", "", *(f"- {k}: {v}" for k, v in machine.items()), "",
              "## Command", "", "```", meta["command"], "```", ""]
    if meta.get("skipped"):
        lines += ["Skipped: " + "; ".join(meta["skipped"]), ""]
    path.write_text("\n".join(lines))


def _longest(summaries: Sequence[Summary]) -> int:
    return max((len(s.acceptance_histogram) for s in summaries if s.acceptance_histogram), default=1)


def _check_lines(runs: Sequence[Run], config: dict) -> list[str]:
    lines = []
    greedy = config["temperature"] == 0
    hf = [r for r in runs if r.method == HF_GENERATE and r.matches_ar is not None]
    if hf:
        agree = sum(r.matches_ar for r in hf)
        lines.append(f"- transformers `generate` (greedy) produced exactly our `ar` tokens on {agree} of {len(hf)} "
                     f"prompts ({100 * agree / len(hf):.0f}%).")
    elif any(r.method == HF_GENERATE for r in runs) and not greedy:
        lines.append("- transformers baselines sample with their own noise at temperature > 0, so their outputs are "
                     "not compared with ours.")
    ours = [r for r in runs if r.method not in BASELINES and r.method != "ar"]
    if ours:
        agree = sum(bool(r.matches_ar) for r in ours)
        lines.append(f"- Speculative runs with exactly the `ar` output: {agree} of {len(ours)}"
                     + (" (lossless)." if agree == len(ours) else "."))
    misses = [r for r in runs if r.matches_ar is False]
    if misses:
        ar = {(r.dataset, r.prompt_id): r.token_ids for r in runs if r.method == "ar"}
        lines.append("- Outputs that differ from `ar` (in float32 only genuine near-ties of the top two logits should "
                     "do this; listed, never hidden):")
        for r in misses:
            ref = ar[(r.dataset, r.prompt_id)]
            at = next((i for i, (a, b) in enumerate(zip(r.token_ids, ref)) if a != b), min(len(ref), r.new_tokens))
            lines.append(f"  - {r.dataset} {r.prompt_id} {variant_label(r.method, r.budget, r.lookup)}: first difference at new "
                         f"token {at}")
    return lines


def _analysis_lines(analysis: dict) -> list[str]:
    depth = analysis["depth"]
    conditional = depth.get("tv_conditional") is not None
    lines = ["## Draft distributions against the target (teacher-forced)", "",
             f"{analysis['sequences']} prompts, the target's greedy continuation, {analysis['anchors']} anchors "
             "drafted in all. At each depth d, the drafter's distribution for the token at anchor + d is compared "
             "with the target's softmax there: TV = ½ Σ|p − q|, and the target's mass on the drafter's top-k "
             "tokens. Marginal: the drafter's block output (DFlash, DDTree). Conditional: TreeFlash's head given "
             "the true previous token.", "",
             "| depth | anchors | TV marginal" + (" | TV conditional" if conditional else "")
             + "".join(f" | top-{k} mass marginal" + (f" | top-{k} mass conditional" if conditional else "")
                       for k in analysis["ks"]) + " |",
             "|---|---|---" + ("|---" if conditional else "") + "|---" * (len(analysis["ks"]) * (1 + conditional)) + "|"]
    for i, d in enumerate(depth["depth"]):
        cells = [str(d), str(depth["count"][i]), fmt(depth["tv_marginal"][i], ".3f")]
        if conditional:
            cells.append(fmt(depth["tv_conditional"][i], ".3f"))
        for k in analysis["ks"]:
            cells.append(fmt(depth["coverage_marginal"][str(k)][i], ".3f"))
            if conditional:
                cells.append(fmt(depth["coverage_conditional"][str(k)][i], ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    accepted = analysis.get("teacher_forced_acceptance")
    if accepted:
        lines += ["", f"Mean accepted length at the same anchors if the target's greedy continuation is verified "
                      f"(trees of {analysis['draw_budget']} nodes; dflash: its chain): "
                  + ", ".join(f"{m} {fmt(v)}" for m, v in accepted.items()) + ". This is a mean over anchor "
                  "positions, not over decoding rounds: a stretch that is drafted whole counts at every one of its "
                  "positions here, but decoding crosses it in one round, so these means can exceed tau - 1."]
    return lines
