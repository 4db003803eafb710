import pytest
import torch

from treeflash.errors import TreeFlashError
from treeflash.trees import tree_attention_mask

from treeflash.targets import norm_map

from helpers import DEVICES, branch_of, random_tree, tiny_target

FAMILIES = ["llama", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_matches_transformers(family):
    target = tiny_target(family, dtype=torch.float32)
    ids = torch.randint(0, target.vocab_size, (23,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = target.model(ids[None], output_hidden_states=True)
    cache = target.new_cache(64)
    out = target.forward(ids, torch.arange(23), cache, feature_layers=(4, 1))
    torch.testing.assert_close(out.logits, ref.logits[0], atol=1e-4, rtol=1e-4)
    # Feature layer j is the output of decoder layer j, i.e. hidden_states[j + 1].
    torch.testing.assert_close(out.features[:, :32], ref.hidden_states[5][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.features[:, 32:], ref.hidden_states[2][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_tree_attention_equals_causal_attention_on_every_branch(family, device):
    target = tiny_target(family, dtype=torch.float64, device=device)
    context = torch.randint(0, target.vocab_size, (11,), generator=torch.Generator().manual_seed(5)).to(device)
    tree = random_tree(seed=7, size=20, vocab=target.vocab_size)
    cache = target.new_cache(64)
    target.forward(context, torch.arange(11, device=device), cache)
    cache.advance(11)
    mask = torch.ones(21, 11 + 21, dtype=torch.bool, device=device)
    mask[:, 11:] = tree_attention_mask(tree).to(device)
    out = target.forward(tree.tokens.to(device), (11 + tree.depths).to(device), cache, mask=mask, feature_layers=(3,))
    for node in range(21):
        ids = torch.cat((context, tree.tokens[branch_of(tree, node)].to(device)))
        with torch.no_grad():
            ref = target.model(ids[None], output_hidden_states=True)
        torch.testing.assert_close(out.logits[node], ref.logits[0, -1], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(out.features[node], ref.hidden_states[4][0, -1], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compacted_cache_equals_fresh_prefill(family):
    target = tiny_target(family, dtype=torch.float64)
    context = torch.randint(0, target.vocab_size, (9,), generator=torch.Generator().manual_seed(11))
    tree = random_tree(seed=13, size=15, vocab=target.vocab_size)
    deepest = int(tree.depths.argmax())
    path = branch_of(tree, deepest)
    cache = target.new_cache(64)
    target.forward(context, torch.arange(9), cache)
    cache.advance(9)
    mask = torch.ones(16, 9 + 16, dtype=torch.bool)
    mask[:, 9:] = tree_attention_mask(tree)
    target.forward(tree.tokens, 9 + tree.depths, cache, mask=mask)
    cache.compact(torch.tensor(path))
    assert cache.length == 9 + len(path)
    nxt = torch.tensor([5])
    out = target.forward(nxt, torch.tensor([cache.length]), cache)
    committed = torch.cat((context, tree.tokens[path], nxt))
    fresh_cache = target.new_cache(64)
    fresh = target.forward(committed, torch.arange(committed.numel()), fresh_cache, logits_rows=slice(-1, None))
    torch.testing.assert_close(out.logits, fresh.logits, atol=1e-10, rtol=1e-10)


def test_cache_overflow_is_a_clear_error():
    target = tiny_target("llama")
    cache = target.new_cache(8)
    with pytest.raises(TreeFlashError, match="cache slots"):
        target.forward(torch.arange(9), torch.arange(9), cache)


def test_unsupported_architecture_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    from treeflash.targets import Target

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(TreeFlashError, match="not supported"):
        Target(model)


def test_missing_target_path_is_a_clear_error(tmp_path):
    from treeflash.targets import load_target

    with pytest.raises(TreeFlashError, match="does not exist"):
        load_target(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(TreeFlashError, match="no config.json"):
        load_target(str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_rms_norms_compute_what_the_model_norms_compute(family):
    target = tiny_target(family, dtype=torch.float32)
    x = 3 * torch.randn(7, target.hidden_size, generator=torch.Generator().manual_seed(5))
    pairs = [(norm_map(target.final_norm), target.final_norm)]
    for layer, maps in zip(target.layers, target.maps):
        pairs += [(maps.input_norm, layer.input_layernorm), (maps.post_norm, layer.post_attention_layernorm)]
        if family == "qwen3":
            q = torch.randn(7, target.num_heads, target.head_dim, generator=torch.Generator().manual_seed(6))
            torch.testing.assert_close(maps.q_norm(q), layer.self_attn.q_norm(q), atol=1e-6, rtol=0)
            torch.testing.assert_close(maps.k_norm(q), layer.self_attn.k_norm(q), atol=1e-6, rtol=0)
    with torch.no_grad():
        for layer in target.layers:  # norms that are not all ones, so a dropped weight shows
            layer.input_layernorm.weight.normal_(generator=torch.Generator().manual_seed(7))
        for fused, module in pairs:
            assert fused is not module  # the fused path is taken for every float32 norm of these families
            torch.testing.assert_close(fused(x), module(x), atol=1e-6, rtol=0)
    half = tiny_target(family, dtype=torch.bfloat16)
    assert half.maps[0].input_norm is half.layers[0].input_layernorm  # bfloat16 keeps the module's rounding


def test_a_default_target_copy_without_architectures_gets_them(tmp_path):
    """Copies converted before `architectures` was written get it on their next load (tools such as llama.cpp's
    converter refuse a config.json without it); the rest of the config is kept."""
    import json

    from treeflash.targets import _name_architecture

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 576}))
    _name_architecture(config)
    assert json.loads(config.read_text()) == {"architectures": ["LlamaForCausalLM"], "hidden_size": 576,
                                               "model_type": "llama"}
    config.write_text(json.dumps({"architectures": ["Other"]}))
    _name_architecture(config)
    assert json.loads(config.read_text()) == {"architectures": ["Other"]}  # never overwritten


def test_concurrent_first_uses_convert_the_default_target_once(tmp_path, monkeypatch):
    """Two processes (here threads, which flock treats alike) asking for the default target at once: one
    converts, the other waits for it and reads the result instead of replacing it while it is being read."""
    import json
    import threading
    import time

    import treeflash.targets as targets

    calls = []

    def convert(out):
        calls.append(out)
        time.sleep(0.3)  # long enough for the other caller to arrive while this one converts
        out.mkdir(parents=True)
        for name in ("model.safetensors", "tokenizer.json"):
            (out / name).write_text("x")
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setenv("TREEFLASH_CACHE", str(tmp_path))
    monkeypatch.setattr(targets, "_convert_default_target", convert)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(targets.default_target_path())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and paths == [tmp_path / "SmolLM2-135M-Instruct"] * 2
