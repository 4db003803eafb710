"""Integration tests on the real default target, SmolLM2-135M-Instruct (converted from the bundled GGUF on
first use, then loaded from the cache)."""

import pytest
import torch

from treeflash.decoding import METHODS, DecodeConfig, Decoder
from treeflash.drafters import new_drafter

from helpers import needs_default_model

pytestmark = [pytest.mark.slow, needs_default_model]

PROMPTS = ["Write a haiku about the sea.", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""]


@pytest.fixture(scope="module")
def target():
    from treeflash.targets import load_target

    return load_target()


def test_the_cached_default_target_names_its_architecture(target):
    import json

    from treeflash.targets import default_target_path

    assert json.loads((default_target_path() / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_default_target_shape(target):
    assert (target.num_layers, target.hidden_size, target.num_heads, target.num_kv_heads) == (30, 576, 9, 3)
    assert target.vocab_size == 49152 and target.eos_token_ids[0] == 2
    assert new_drafter(target).config.mask_token_id == 16  # <empty_output>


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ar_equals_transformers_generate(target, prompt):
    ids = target.encode_prompt(prompt)
    ours = Decoder(target).generate(ids, DecodeConfig(method="ar", max_new_tokens=64))
    with torch.no_grad():
        ref = target.model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)
    assert ours.token_ids == ref[0, len(ids):].tolist()
    assert len(ours.token_ids) > 20


def test_every_method_with_an_untrained_drafter_equals_ar(target):
    drafter = new_drafter(target)
    decoder = Decoder(target, drafter)
    ids = target.encode_prompt(PROMPTS[0])
    reference = decoder.generate(ids, DecodeConfig(method="ar", max_new_tokens=40, stop_at_eos=False)).token_ids
    for method in METHODS[1:]:
        result = decoder.generate(ids, DecodeConfig(method=method, budget=8, max_new_tokens=40, stop_at_eos=False))
        assert result.token_ids == reference, method


def test_sampling_with_the_real_model_matches_ar_for_a_seed(target):
    drafter = new_drafter(target, seed=5)
    decoder = Decoder(target, drafter)
    ids = target.encode_prompt(PROMPTS[1], chat=False)
    config = dict(max_new_tokens=32, temperature=0.7, top_k=50, seed=11, stop_at_eos=False)
    reference = decoder.generate(ids, DecodeConfig(method="ar", **config)).token_ids
    assert decoder.generate(ids, DecodeConfig(method="treeflash", **config)).token_ids == reference


def test_the_shipped_drafter_is_lossless_and_accepts_drafts(target):
    """The trained drafter committed in the repository loads by default (in bfloat16 on AMX CPUs), every
    method with it equals ar greedy, and it gets drafts accepted: tau well above an untrained drafter's."""
    from treeflash.api import SHIPPED_DRAFTERS, resolve_drafter

    assert (SHIPPED_DRAFTERS[target.name] / "model.safetensors").exists()
    drafter = resolve_drafter(None, target)
    assert drafter.ar_approximation is not None and drafter.draft_vocab is not None
    decoder = Decoder(target, drafter)
    ids = target.encode_prompt(PROMPTS[1], chat=False)
    reference = decoder.generate(ids, DecodeConfig(method="ar", max_new_tokens=64, stop_at_eos=False)).token_ids
    taus = {}
    for method in METHODS[1:]:
        result = decoder.generate(ids, DecodeConfig(method=method, budget=32, max_new_tokens=64, stop_at_eos=False,
                                                    lookup=0))
        assert result.token_ids == reference, method
        taus[method] = result.tau
    untrained = Decoder(target, new_drafter(target)).generate(  # accepts ~nothing: 32 tokens tell
        ids, DecodeConfig(method="treeflash", budget=32, max_new_tokens=32, stop_at_eos=False, lookup=0))
    assert taus["treeflash"] > untrained.tau + 0.2, (taus, untrained.tau)


def test_ngram_lookup_on_the_real_model_is_lossless_and_lands(target):
    """Every method with n-gram lookup equals ar greedy; on code that repeats its names, lookups alone (ar)
    commit more than one token in some rounds."""
    from treeflash.api import resolve_drafter

    decoder = Decoder(target, resolve_drafter(None, target))
    ids = target.encode_prompt("Write a Python function that returns the sum of the squares of a list, with a "
                               "docstring and three examples of calling it.")
    reference = decoder.generate(ids, DecodeConfig(method="ar", max_new_tokens=96, lookup=0)).token_ids
    taus = {}
    for method in METHODS:
        result = decoder.generate(ids, DecodeConfig(method=method, budget=4, max_new_tokens=96, lookup=8))
        assert result.token_ids == reference, method
        taus[method] = result.tau
    assert taus["ar"] > 1.1, taus  # 1.17 here: 7 lookup tokens accepted in 41 rounds


def test_the_shipped_drafter_reads_its_anchor(target):
    """The failure of the first shipped drafter, checked on regenerated data (the last shard; the check is of
    the mechanism, not of generalisation, which training validates on held-out sequences): its marginals must depend
    on the anchor token (the first drafter's anchor sensitivity was 3e-5) and decay with the block position
    (its profile was flat at ~0.09)."""
    from pathlib import Path

    from treeflash.api import resolve_drafter
    from treeflash.train.records import load_sequences
    from treeflash.train.config import TrainConfig
    from treeflash.train.validation import evaluate

    data = Path(__file__).resolve().parents[1] / "training" / "data" / "smollm2-sharegpt" / "shard-00065.jsonl.gz"
    drafter = resolve_drafter(None, target).float()
    metrics = evaluate(drafter, target, load_sequences(data)[:8], TrainConfig(anchors=32))
    top1 = metrics["marginal_top1"]
    assert metrics["anchor_sensitivity"] > 0.5, metrics
    assert top1[0] > 0.25 and top1[0] > top1[-1] + 0.1, top1


def test_the_shipped_drafter_exported_for_vllm_drafts_what_it_drafted(target, tmp_path, capsys):
    """`treeflash export shipped OUT --format vllm`: the config and weights vLLM's DFlash loader reads, and the
    export, loaded back here, drafts exactly what the shipped drafter drafts (the dflash method, greedy)."""
    import json

    from safetensors.torch import load_file

    from treeflash.api import SHIPPED_DRAFTERS
    from treeflash.cli import main
    from treeflash.drafters import load_drafter

    assert main(["export", "shipped", str(tmp_path / "vllm"), "--format", "vllm"]) == 0
    # By its path, as the README shows it: the checkpoint names the default target, so no --target is needed.
    assert main(["export", str(SHIPPED_DRAFTERS["SmolLM2-135M-Instruct"]), str(tmp_path / "by-path"),
                 "--format", "vllm"]) == 0
    assert (tmp_path / "by-path" / "model.safetensors").read_bytes() == (tmp_path / "vllm" / "model.safetensors").read_bytes()
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert config["block_size"] == 8 and config["architectures"] == ["DFlashDraftModel"]
    assert set(config["dflash_config"]) == {"target_layer_ids", "mask_token_id"}
    weights = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "d2t", "lm_head.weight"} <= set(weights)
    assert any(k.startswith("layers.0.") for k in weights)
    shipped = load_drafter(SHIPPED_DRAFTERS[target.name], target)
    exported = load_drafter(tmp_path / "vllm", target)
    ids = target.encode_prompt(PROMPTS[0])
    config = DecodeConfig(method="dflash", max_new_tokens=48)
    a, b = Decoder(target, shipped).generate(ids, config), Decoder(target, exported).generate(ids, config)
    assert a.token_ids == b.token_ids and a.acceptance_lengths == b.acceptance_lengths
    features = target.forward(torch.tensor(ids), torch.arange(len(ids)), target.new_cache(len(ids)),
                              feature_layers=shipped.config.target_layer_ids, logits_rows=None).features
    assert torch.equal(shipped.draft(target, 7, features, shipped.new_cache(256)).logits,
                       exported.draft(target, 7, features, exported.new_cache(256)).logits)
