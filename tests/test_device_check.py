"""scripts/device_check.py, the prepared GPU check, on the CPU in its smoke mode: the same code path on tiny
shapes must finish and report finite, positive numbers in the structure docs/gpu.md describes (no timing is
asserted: this machine is not the one the numbers are for). The GPU-round changes it times (the tree mask built
on the device, Target.expand_kv) are checked on every device here, so `pytest -k cuda` covers them on a GPU."""

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from treeflash.trees import tree_attention_mask

from helpers import DEVICES, random_tree, tiny_target

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(device_check, tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        device_check.main(["--smoke", "--out", str(out), "--repeats", "1", "--warmup", "0"])
    return json.loads((out / "device_check.json").read_text()), (out / "device_check.md").read_text(), printed.getvalue()


def test_the_smoke_run_prints_its_tables(smoke):
    """The CPU smoke run prints the report it writes (the scripts' smoke test for device_check.py)."""
    _, report, printed = smoke
    assert "**Projection, not a measurement**" in printed and "| treeflash | 256 |" in printed
    assert report.strip() in printed


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_the_smoke_report_has_every_stage_size_and_projection(device_check, smoke):
    report, _, _ = smoke
    assert report["smoke"] and report["cuda_tests"] is None and report["skipped"] == []
    for key in ("command", "date", "device", "torch", "transformers", "python"):
        assert report[key]
    (result,) = report["shapes"].values()
    stages = result["stages_ms"]
    sizes = [str(s) for s in device_check.TREE_SIZES]
    for stage in ("ar", "hf_generate_step", "draft", "head", "commit"):
        assert _positive(stages[stage]), stage
    verify = ("verify", f"verify_lookup{device_check.LOOKUP}", "verify_expand_kv")
    assert all(list(stages[part]) == sizes for part in verify)
    assert list(stages["tree"]["ddtree"]) == list(stages["tree"]["treeflash"]) == sizes[1:]
    assert all(_positive(t) for part in verify for t in stages[part].values())
    assert all(_positive(t) for method in stages["tree"].values() for t in method.values())
    block = str(result["shape"]["block_size"])
    assert list(result["rounds_ms"]) == ["dflash", "ddtree", "treeflash"]
    assert list(result["rounds_ms"]["dflash"]) == [block]
    for dataset in device_check.PAPER_TAU:
        projected = result["projection"][dataset]
        assert all(_positive(x) for sizes in projected.values() for x in sizes.values())


def test_the_projection_is_tau_times_ar_over_round(device_check, smoke):
    report, _, _ = smoke
    (result,) = report["shapes"].values()
    ar, rounds = result["stages_ms"]["ar"], result["rounds_ms"]
    gsm8k = result["projection"]["gsm8k"]
    assert gsm8k["ddtree"]["64"] == pytest.approx(9.54 * ar / rounds["ddtree"]["64"])
    assert gsm8k["treeflash"]["64"] == pytest.approx(9.54 * 1.12 * ar / rounds["treeflash"]["64"])
    stages = result["stages_ms"]
    parts = ("draft", "head", "commit")
    assert rounds["treeflash"]["64"] == pytest.approx(sum(stages[p] for p in parts) + stages["tree"]["treeflash"]["64"]
                                                      + stages["verify"]["64"])


def test_the_markdown_labels_the_projection_and_names_the_command(smoke):
    _, text, _ = smoke
    assert "**Projection, not a measurement**" in text and "`python3 scripts/device_check.py --smoke" in text
    assert "| treeflash | 256 |" in text and "| dflash | 8 |" in text and "verify, expand_kv" in text


def test_past_its_budget_it_skips_parts_and_says_so(device_check, tmp_path):
    device_check.main(["--smoke", "--out", str(tmp_path), "--budget-seconds", "0"])
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["shapes"] == {} and report["skipped"] == ["tiny-qwen3 profile"]
    assert "**Skipped for time**" in (tmp_path / "device_check.md").read_text()


def test_the_shapes_are_the_published_qwen3_configs(device_check):
    four, eight = device_check.SHAPES["qwen3-4b"], device_check.SHAPES["qwen3-8b"]
    assert (four.hidden_size, four.intermediate_size, four.tie_word_embeddings) == (2560, 9728, True)
    assert (eight.hidden_size, eight.intermediate_size, eight.tie_word_embeddings) == (4096, 12288, False)
    for shape in (four, eight):
        assert (shape.num_hidden_layers, shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim,
                shape.vocab_size) == (36, 32, 8, 128, 151936)
        assert shape.target_layer_ids == (1, 9, 17, 25, 33) and shape.mask_token_id == 151669
    # bf16 bytes a one-token pass reads, LM head included: 3.63B + 0.39B and 6.95B + 0.62B parameters
    assert four.weight_bytes() / 1e9 == pytest.approx(8.04, abs=0.02)
    assert eight.weight_bytes() / 1e9 == pytest.approx(15.13, abs=0.02)


def test_a_test_run_past_its_time_limit_is_reported_not_raised(device_check):
    tests = device_check.run_cuda_tests(timeout=0.01)
    assert tests["returncode"] is None and "stopped after" in tests["summary"]


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_keys_and_values_give_the_same_logits(device):
    """Target.expand_kv, which the check times on a GPU, changes the attention kernel's input, not the numbers
    (exactly on the CPU; on CUDA the kernel it unlocks sums in another order)."""
    target = tiny_target("qwen3", dtype=torch.float64 if device == "cpu" else torch.float32, device=device)
    tree = random_tree(3, 12, target.vocab_size)
    logits = []
    for expand in (False, True):
        target.expand_kv = expand
        cache = target.new_cache(32)
        target.forward(torch.arange(8, device=device), torch.arange(8, device=device), cache)
        cache.advance(8)
        mask = torch.ones(13, 21, dtype=torch.bool, device=device)
        mask[:, 8:] = tree_attention_mask(tree, device)
        logits.append(target.forward(tree.tokens.to(device), (8 + tree.depths).to(device), cache, mask).logits)
    if device == "cpu":
        assert torch.equal(logits[0], logits[1])
    else:
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_the_tree_mask_built_on_a_device_is_the_cpu_one(device):
    for seed in range(5):
        tree = random_tree(seed, 40, 97)
        mask = tree_attention_mask(tree, device)
        assert mask.device.type == device and torch.equal(mask.cpu(), tree_attention_mask(tree))


def test_the_dry_estimate_counts_both_shapes_and_bounds_the_total(device_check, smoke):
    report, _, _ = smoke
    estimate = device_check.dry_estimate(report)
    assert set(estimate["shapes"]) == set(device_check.SHAPES)
    for row in estimate["shapes"].values():
        low, high = row["timed_seconds"]
        assert 0 < low <= high and row["target_passes"] > 0 and row["ar_step_roofline_ms"] > 0
    low, high = estimate["total_seconds"]
    assert 0 < low <= high
    assert "**Total:" in device_check.estimate_markdown(estimate)
