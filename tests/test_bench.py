"""`treeflash bench`: the metrics on hand-built cases, aggregation, the analyses' distances and tree drawing,
and an end-to-end run on a tiny model saved to disk (hermetic)."""

import csv
import json
import math

import pytest
import torch

from treeflash.bench.analysis import (full_vocab_probs, teacher_forced, teacher_forced_acceptance, top_k_coverage,
                                      total_variation)
from treeflash.bench.metrics import (HF_GENERATE, Run, acceptance_histogram, seconds_per_token, speedup, summarize,
                                     tokens_per_second)
from treeflash.bench.plots import TreePanel, draw_trees, tree_layout
from treeflash.bench.runner import BenchConfig
from treeflash.cli import main
from treeflash.decoding import Decoder, tau
from treeflash.errors import TreeFlashError
from treeflash.machine import device_tag
from treeflash.trees import DraftTree

from helpers import OracleDrafter, greedy_reference, tiny_target

# --------------------------------------------------------------------------------------------------
# Metrics


def test_tau_counts_the_bonus_token():
    assert tau([3, 0, 5]) == pytest.approx(1 + 8 / 3)
    assert tau([0, 0, 0, 0]) == 1.0  # plain ar
    assert math.isnan(tau([]))


def test_acceptance_histogram():
    assert acceptance_histogram([3, 0, 5, 3]) == [1, 0, 0, 2, 0, 1]
    assert acceptance_histogram([0], size=4) == [1, 0, 0, 0]
    assert acceptance_histogram([]) == []


def test_speedup_is_a_ratio_of_times_per_token():
    # The baseline made 100 tokens in 10 s; the method 50 tokens (it hit EOS sooner) in 2 s.
    base, fast = seconds_per_token(100, 10.0), seconds_per_token(50, 2.0)
    assert speedup(base, fast) == pytest.approx(0.1 / 0.04) == pytest.approx(2.5)
    # Per token, it is the same number as the ratio of tokens/s ...
    assert speedup(base, fast) == pytest.approx(tokens_per_second(50, 2.0) / tokens_per_second(100, 10.0))
    # ... and not the ratio of wall times, which rewards the shorter output.
    assert 10.0 / 2.0 != pytest.approx(speedup(base, fast))
    assert math.isnan(speedup(base, seconds_per_token(0, 1.0)))
    assert math.isnan(tokens_per_second(5, 0.0))


def _run(dataset, prompt, method, budget, tokens, seconds, lengths=None, stages=None, same=True, lookup=0):
    return Run(dataset, prompt, method, budget, prompt_tokens=4, token_ids=tokens, seconds=seconds,
               stop_reason="max_new_tokens", rounds=None if lengths is None else len(lengths),
               acceptance_lengths=lengths, stage_seconds=stages or {}, matches_ar=same, lookup=lookup)


def test_summaries_pool_runs_and_take_speedups_per_dataset():
    runs = [
        _run("a", "p1", "ar", 0, [1] * 10, 1.0, [0] * 9, {"verify": 0.9}),
        _run("a", "p2", "ar", 0, [1] * 30, 3.0, [0] * 29, {"verify": 2.9}),
        _run("a", "p1", HF_GENERATE, 0, [1] * 10, 2.0),
        _run("a", "p2", HF_GENERATE, 0, [1] * 30, 6.0, same=False),
        _run("a", "p1", "ddtree", 64, [1] * 10, 0.5, [3, 0, 5], {"draft": 0.1, "verify": 0.3}),
        _run("a", "p2", "ddtree", 64, [1] * 30, 1.5, [2, 2], {"draft": 0.2, "verify": 0.9}),
        _run("b", "p3", "ar", 0, [1] * 20, 4.0, [0] * 19),
        _run("b", "p3", "ddtree", 64, [1] * 20, 1.0, [4, 4, 4, 4]),
        _run("a", "p1", "ddtree", 64, [1] * 10, 0.25, [9], lookup=8),
    ]
    summaries = summarize(runs)
    by = {(s.dataset, s.method, s.budget): s for s in summaries if not s.lookup}
    tree = by[("a", "ddtree", 64)]
    assert (tree.runs, tree.new_tokens, tree.seconds, tree.rounds) == (2, 40, 2.0, 5)
    assert tree.tau == pytest.approx(1 + 12 / 5)  # over all rounds, not a mean of per-run taus
    assert tree.tokens_per_second == pytest.approx(20.0)
    assert tree.speedup_vs_ar == pytest.approx((4.0 / 40) / (2.0 / 40)) == pytest.approx(2.0)
    assert tree.speedup_vs_hf_generate == pytest.approx(4.0)
    assert tree.acceptance_histogram == [1, 0, 2, 1, 0, 1]
    assert tree.stage_seconds == pytest.approx({"draft": 0.3, "verify": 1.2})
    assert tree.stage_ms_per_round("verify") == pytest.approx(1000 * 1.2 / 5)
    assert by[("a", HF_GENERATE, 0)].agreement_with_ar == 0.5
    assert by[("a", HF_GENERATE, 0)].tau is None and by[("a", HF_GENERATE, 0)].rounds is None
    assert by[("a", "ar", 0)].tau == 1.0 and by[("a", "ar", 0)].speedup_vs_ar == 1.0
    # "all" pools both datasets: 60 ar tokens in 8 s against 60 ddtree tokens in 3 s.
    assert by[("all", "ddtree", 64)].speedup_vs_ar == pytest.approx(8 / 3)
    assert by[("all", "ddtree", 64)].tau == pytest.approx(1 + 28 / 9)
    assert by[("all", "ddtree", 64)].speedup_vs_hf_generate is None or by[("all", "ddtree", 64)].speedup_vs_hf_generate > 0
    # A lookup series pools apart from the same method and budget without it, against the same ar.
    grafted = next(s for s in summaries if s.dataset == "a" and s.lookup == 8)
    assert (grafted.runs, grafted.tau, grafted.label, grafted.series) == (1, 10.0, "ddtree@64+lookup8", "ddtree+lookup8")
    assert grafted.speedup_vs_ar == pytest.approx((4.0 / 40) / (0.25 / 10))


def test_bench_config_validates_and_orders_variants():
    config = BenchConfig(methods=("treeflash", "dflash"), budgets=(32, 8, 32), prompt_lookup_tokens=7, lookups=(0,))
    assert config.methods == ("ar", "treeflash", "dflash") and config.budgets == (8, 32)
    assert config.variants() == [("ar", 0, 0), ("hf-generate", 0, 0), ("hf-prompt-lookup", 7, 0), ("treeflash", 8, 0),
                                 ("treeflash", 32, 0), ("dflash", None, 0)]
    config = BenchConfig(methods=("ddtree", "dflash"), budgets=(4,), lookups=(6, 0, 6), hf_baselines=False)
    assert config.variants() == [("ar", 0, 0), ("ddtree", 4, 0), ("ddtree", 4, 6), ("dflash", None, 0)]
    for bad in (dict(methods=("eagle",)), dict(budgets=(0,)), dict(prompts=0), dict(temperature=-1.0),
                dict(lookups=()), dict(lookups=(-1,)), dict(lookup_ngram=0), dict(lookup_ngram=5)):
        with pytest.raises(TreeFlashError):
            BenchConfig(**bad)


def test_device_tags():
    assert device_tag({"device": "cpu", "cpu": "Intel(R) Xeon(R) Processor @ 2.10GHz", "torch_threads": 2}) == \
        "cpu-intel-xeon-2t"
    assert device_tag({"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "cpu": "x"}) == "gpu-h100-80gb-hbm3"


# --------------------------------------------------------------------------------------------------
# Analyses


def test_total_variation_and_top_k_coverage_on_hand_built_distributions():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.5, 0.3, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert total_variation(p, q).tolist() == pytest.approx([0.0, 0.75])
    assert total_variation(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(1.0)
    # The target's mass on the drafter's top-k: drafter ranks token 3 first, target puts 0.1 there.
    p = torch.tensor([0.6, 0.2, 0.1, 0.1])
    q = torch.tensor([0.05, 0.15, 0.3, 0.5])
    assert [top_k_coverage(p, q, k).item() for k in (1, 2, 3, 16)] == pytest.approx([0.1, 0.2, 0.4, 1.0])


def test_draft_probabilities_are_placed_on_the_target_vocabulary():
    logits = torch.log(torch.tensor([[0.75, 0.25]]))
    out = full_vocab_probs(logits, torch.tensor([3, 1]), vocab_size=5)
    assert out[0].tolist() == pytest.approx([0.0, 0.25, 0.0, 0.75, 0.0])
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    assert total_variation(p, out).item() == pytest.approx(0.25)


def _tree(tokens, parents):
    depths = [0] * len(tokens)
    for i in range(1, len(tokens)):
        depths[i] = depths[parents[i]] + 1
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths), torch.zeros(len(tokens)))


def test_teacher_forced_acceptance_and_layout_on_a_hand_built_tree():
    #        root(10) -> 11 -> 12 -> 13
    #                 \      \-> 22
    #                  \-> 21
    tree = _tree([10, 11, 21, 12, 22, 13], [-1, 0, 0, 1, 1, 3])
    sequence = [5, 6, 10, 11, 22, 7]  # anchor at 2: the target continues 11, 22, 7
    walk = teacher_forced_acceptance(tree, sequence, anchor=2)
    assert walk.path == [0, 1, 4] and walk.tokens == [11, 22] and walk.bonus == 7
    walk = teacher_forced_acceptance(tree, [10, 11, 12, 13], anchor=0)  # runs off the end of the sequence
    assert walk.tokens == [11, 12, 13] and walk.bonus == -1
    x, y = tree_layout(tree)
    assert x == [0, 1, 1, 2, 2, 3]
    assert y[5] == 0 and y[3] == 0 and y[4] == 1 and y[2] == 2  # leaves top-down in best-first order
    assert y[1] == 0.5 and y[0] == 1.25  # parents midway between their first and last child


def test_tree_drawing_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    tree = _tree([10, 11, 21, 12, 22, 13], [-1, 0, 0, 1, 1, 3])
    panels = [TreePanel("DDTree", tree, [0, 1, 4], ["root", "a", "b$", "\\n", "_the", "d"]),
              TreePanel("TreeFlash", _tree([10, 11], [-1, 0]), [0, 1], ["root", "a"])]
    path = draw_trees(panels, tmp_path / "trees.png", caption="a hand-built tree")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_teacher_forced_analysis_with_an_oracle_drafter_accepts_everything():
    """A drafter that proposes the target's own greedy continuation: at every anchor the drafted block is the
    true continuation, so the walk accepts up to the end of the sequence, and the drafter's top-1 holds the
    target's largest probability at every depth (an off-by-one in the depth alignment would break both)."""
    target = tiny_target("llama", dtype=torch.float64)
    prompt = [3, 17, 42, 8]
    continuation = greedy_reference(target, prompt, 20)
    drafter = OracleDrafter(target, prompt + continuation, block_size=6)
    stats, best = teacher_forced(Decoder(target, drafter), [("oracle", prompt, continuation)], anchors=50,
                                 generator=torch.Generator().manual_seed(0), draw_budget=8)
    assert stats["anchors"] == len(continuation) - 1  # every anchor position, since 50 > 19
    length = len(prompt) + len(continuation)
    reach = [min(5, length - 1 - a) for a in range(len(prompt), length - 1)]
    assert stats["teacher_forced_acceptance"]["dflash"] == pytest.approx(sum(reach) / len(reach))
    assert stats["teacher_forced_acceptance"]["ddtree@8"] == pytest.approx(sum(reach) / len(reach))
    assert stats["teacher_forced_acceptance"]["treeflash@8"] == pytest.approx(sum(reach) / len(reach))
    depth = stats["depth"]
    assert depth["depth"] == [1, 2, 3, 4, 5] and depth["count"][0] == len(continuation) - 1
    with torch.no_grad():
        probs = torch.softmax(target.model(torch.tensor([prompt + continuation])).logits[0].float(), dim=-1)
    top = probs.max(dim=-1).values  # the target's greedy token's probability at each row
    expected = top[len(prompt): length - 1].mean().item()  # depth 1: rows a for every anchor a
    assert depth["coverage_marginal"]["1"][0] == pytest.approx(expected, abs=1e-5)
    assert depth["coverage_conditional"]["1"][0] == pytest.approx(expected, abs=1e-5)
    assert all(tv < 1 for tv in depth["tv_marginal"])
    assert len(best["walks"]["treeflash"].tokens) == 5  # the drawn anchor accepts a whole block


# --------------------------------------------------------------------------------------------------
# End to end on a tiny model saved to disk

from test_cli import model_dir  # noqa: E402,F401  (the tiny on-disk chat model, shared with the CLI tests)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "tiny.jsonl"
    path.write_text(json.dumps({"id": "one", "prompt": "w3 w9 w27"}) + "\n"
                    + json.dumps({"id": "two", "messages": [{"role": "user", "content": "w5 w6"}]}) + "\n")
    return path


def test_bench_end_to_end_on_a_tiny_model(model_dir, prompts_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    assert main(["bench", "--target", str(model_dir), "--drafter", "untrained", "--datasets", str(prompts_file),
                 "--budgets", "4,8", "--lookups", "0,3", "--lookup-ngram", "1", "--max-new-tokens", "8", "--warmup", "1", "--analyses", "--anchors", "3",
                 "--draw-budget", "6", "--threads", "1", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    assert torch.get_num_threads() == threads  # --threads does not outlive the command

    data = json.loads((out / "runs.json").read_text())
    variants = {(r["method"], r["budget"], r["lookup"]) for r in data["runs"]}
    assert variants == {("ar", 0, 0), ("hf-generate", 0, 0), ("hf-prompt-lookup", 10, 0), ("dflash", 15, 0)} | {
        (m, b, lookup) for m in ("ddtree", "treeflash") for b in (4, 8) for lookup in (0, 3)}
    assert len(data["runs"]) == 2 * len(variants)
    for run in data["runs"]:
        assert {"dataset", "prompt_id", "method", "budget", "new_tokens", "rounds", "tau", "acceptance_lengths",
                "seconds", "stage_seconds", "tokens_per_second", "peak_memory_bytes"} <= set(run)
        assert run["dataset"] == "tiny" and run["prompt_id"] in ("one", "two") and 1 <= run["new_tokens"] <= 8
        assert run["matches_ar"] is True  # every method is lossless, and HF greedy equals our ar in float32
        if run["method"].startswith("hf-"):
            assert run["tau"] is None and run["rounds"] is None
        else:
            assert run["tau"] == pytest.approx(1 + sum(run["acceptance_lengths"]) / run["rounds"])
            assert {"prefill", "tree", "verify", "commit"} <= set(run["stage_seconds"])
    meta = data["meta"]
    assert meta["machine"]["torch_threads"] >= 1 and meta["machine"]["torch"] and meta["machine"]["transformers"]
    assert meta["command"].startswith("treeflash bench --target") and "--budgets 4,8 --lookups 0,3 --lookup-ngram 1" in meta["command"]

    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(variants)  # one dataset: no "all" rows
    ar = next(r for r in rows if r["method"] == "ar")
    assert float(ar["tau"]) == 1.0 and float(ar["speedup_vs_ar"]) == 1.0 and float(ar["agreement_with_ar"]) == 1.0
    tree = next(r for r in rows if r["method"] == "treeflash" and r["budget"] == "8" and r["lookup"] == "0")
    assert float(tree["speedup_vs_ar"]) > 0 and float(tree["speedup_vs_hf_generate"]) > 0
    assert float(tree["verify_ms_per_round"]) > 0 and float(tree["tokens_per_second"]) > 0

    report = (out / "report.md").read_text()
    for needle in ("## Headline", "## Where the time goes", "tokens/s", "speedup vs ar", "produced exactly our `ar` "
                   "tokens on 2 of 2 prompts (100%)", "## Machine", "torch_threads", "## Command", "treeflash bench",
                   "(lossless)", "TV marginal", "treeflash+lookup3"):
        assert needle in report, needle
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["anchors"] == 6 and analysis["depth"]["depth"][0] == 1
    assert all(0 <= v <= 1 for v in analysis["depth"]["tv_marginal"] + analysis["depth"]["tv_conditional"])
    # An untrained head is zero: its conditionals are exactly the marginals.
    assert analysis["depth"]["tv_conditional"] == pytest.approx(analysis["depth"]["tv_marginal"])
    for png in ("tau_by_dataset", "speedup_by_dataset", "budget_sweep", "acceptance_lengths", "tv_by_depth",
                "coverage_by_depth", "trees"):
        assert (out / f"{png}.png").read_bytes()[:4] == b"\x89PNG", png
        assert f"]({png}.png)" in report


def test_bench_errors_are_one_sentence(model_dir, prompts_file, tmp_path, capsys):
    assert main(["bench", "--target", str(model_dir), "--datasets", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path)]) == 2
    assert "neither" in capsys.readouterr().err
    assert main(["bench", "--target", str(model_dir), "--budgets", "0", "--datasets", str(prompts_file)]) == 2
    assert "budget must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--budgets", "a,b"])


def test_bench_without_out_writes_a_new_directory_in_the_cache(model_dir, prompts_file, tmp_path, monkeypatch,
                                                                capsys):
    """A quick look without --out never writes into the source tree nor replaces an earlier run's files."""
    monkeypatch.setenv("TREEFLASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--target", str(model_dir), "--drafter", "untrained", "--datasets", str(prompts_file),
            "--methods", "ar", "--max-new-tokens", "4", "--warmup", "0", "--threads", "1"]
    assert main(argv) == 0
    runs = sorted((tmp_path / "cache" / "bench").glob("*/report.md"))
    assert len(runs) == 1 and str(runs[0].parent) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing beside it, e.g. no results/
