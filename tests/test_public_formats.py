"""Checkpoints in the public z-lab DFlash and ETH TreeFlash layouts load, and give the logits of an
independent plain-tensor reimplementation of those drafters' forward pass (written from their papers and
public code's semantics: context features skip input_layernorm, k_norm on context and block keys, no causal
mask, block position 0 dropped; the head reads [norm(embed(prev)), norm(h)] and corrects the pre-norm h).

Tolerances are float32-sized: transformers' RMSNorm computes in float32 even for float64 inputs."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from treeflash.drafters import load_drafter
from treeflash.errors import TreeFlashError

from helpers import tiny_drafter, tiny_target

H, HEADS, KV, HD, I, LAYERS, B, MASK = 32, 4, 2, 8, 64, 2, 6, 96
LAYER_IDS = [1, 2, 4]
THETA = 10000.0


def _weights(with_head: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.3  # noqa: E731
    sd = {"fc.weight": r(H, 3 * H), "hidden_norm.weight": 1 + r(H), "norm.weight": 1 + r(H)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        sd |= {
            p + "input_layernorm.weight": 1 + r(H), p + "post_attention_layernorm.weight": 1 + r(H),
            p + "self_attn.q_proj.weight": r(HEADS * HD, H), p + "self_attn.k_proj.weight": r(KV * HD, H),
            p + "self_attn.v_proj.weight": r(KV * HD, H), p + "self_attn.o_proj.weight": r(H, HEADS * HD),
            p + "self_attn.q_norm.weight": 1 + r(HD), p + "self_attn.k_norm.weight": 1 + r(HD),
            p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H), p + "mlp.down_proj.weight": r(H, I),
        }
    head = {}
    if with_head:
        head = {"ar_approximation.ug.weight": r(2 * I, 2 * H), "ar_approximation.ug.bias": r(2 * I),
                "ar_approximation.d.weight": r(H, I), "ar_approximation.norm.weight": 1 + r(H)}
    return sd, head


def _config(target, with_head: bool) -> dict:
    config = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": H,
        "intermediate_size": I, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV,
        "head_dim": HD, "rms_norm_eps": 1e-6, "rope_theta": THETA, "rope_scaling": None,
        "max_position_embeddings": 512, "vocab_size": target.vocab_size, "tie_word_embeddings": False,
        "block_size": B, "num_target_layers": target.num_layers,
        "dflash_config": {"mask_token_id": MASK, "target_layer_ids": LAYER_IDS}, "dtype": "float64",
    }
    if with_head:
        config["architectures"] = ["TreeFlashDraftModel"]
        config["treeflash_config"] = {"ar_approximation": "swiglu", "candidate_tokens": 16}
    return config


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions):  # x [n, heads, d]
    inv = 1.0 / THETA ** (torch.arange(0, HD, 2, dtype=torch.float64) / HD)
    ang = positions[:, None].double() * inv
    cos, sin = torch.cat((ang, ang), -1).cos()[:, None], torch.cat((ang, ang), -1).sin()[:, None]
    rot = torch.cat((-x[..., HD // 2:], x[..., : HD // 2]), -1)
    return x * cos + rot * sin


def _reference_draft(sd, target, feats, anchor):
    c = feats.shape[0]
    ctx = _rms(feats @ sd["fc.weight"].T, sd["hidden_norm.weight"])
    block = torch.tensor([anchor] + [MASK] * (B - 1))
    h = target.embed_tokens.weight[block].double()
    pos_ctx, pos_blk = torch.arange(c), torch.arange(c, c + B)
    for i in range(LAYERS):
        w = lambda n: sd[f"layers.{i}.{n}"]  # noqa: E731
        x = _rms(h, w("input_layernorm.weight"))
        kv_in = torch.cat((ctx, x))
        q = _rope(_rms((x @ w("self_attn.q_proj.weight").T).view(B, HEADS, HD), w("self_attn.q_norm.weight")), pos_blk)
        k = _rms((kv_in @ w("self_attn.k_proj.weight").T).view(c + B, KV, HD), w("self_attn.k_norm.weight"))
        k = _rope(k, torch.cat((pos_ctx, pos_blk)))
        v = (kv_in @ w("self_attn.v_proj.weight").T).view(c + B, KV, HD)
        k, v = k.repeat_interleave(HEADS // KV, 1), v.repeat_interleave(HEADS // KV, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HD), -1)
        out = torch.einsum("hqk,khd->qhd", att, v).reshape(B, -1)
        h = h + out @ w("self_attn.o_proj.weight").T
        y = _rms(h, w("post_attention_layernorm.weight"))
        h = h + (torch.nn.functional.silu(y @ w("mlp.gate_proj.weight").T) * (y @ w("mlp.up_proj.weight").T)) @ w("mlp.down_proj.weight").T
    h = h[1:]
    lm = target.lm_head.weight.double()
    return h, _rms(h, sd["norm.weight"]) @ lm.T


def _reference_conditional(sd, head, target, h, parents):
    lm = target.lm_head.weight.double()
    e = _rms(target.embed_tokens.weight[parents].double(), head["ar_approximation.norm.weight"])
    x = torch.cat((e, _rms(h, sd["norm.weight"])), -1)
    u, g = (x @ head["ar_approximation.ug.weight"].T + head["ar_approximation.ug.bias"]).chunk(2, -1)
    delta = (torch.nn.functional.silu(g) * u) @ head["ar_approximation.d.weight"].T
    return _rms(h + delta, sd["norm.weight"]) @ lm.T


def _features(target, n=9):
    ids = torch.randint(0, target.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
    return target.forward(ids, torch.arange(n), target.new_cache(32), feature_layers=tuple(LAYER_IDS)).features


def test_zlab_dflash_layout_loads_and_matches_reference(tmp_path):
    target = tiny_target("qwen3")
    sd, _ = _weights(with_head=False)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(_config(target, with_head=False)))
    drafter = load_drafter(tmp_path, target)
    feats = _features(target)
    ours = drafter.draft(target, 5, feats, drafter.new_cache(32))
    h, logits = _reference_draft(sd, target, feats, 5)
    torch.testing.assert_close(ours.logits.double(), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.hidden, h, atol=1e-5, rtol=1e-5)


def test_eth_treeflash_layout_loads_and_matches_reference(tmp_path):
    target = tiny_target("qwen3")
    sd, head = _weights(with_head=True, seed=4)
    save_file({f"model.{k}": v for k, v in sd.items()} | head, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(_config(target, with_head=True)))
    drafter = load_drafter(tmp_path, target)
    assert drafter.ar_approximation is not None and drafter.config.candidate_tokens == 16
    feats = _features(target)
    ours = drafter.draft(target, 7, feats, drafter.new_cache(32))
    h, logits = _reference_draft(sd, target, feats, 7)
    torch.testing.assert_close(ours.logits.double(), logits, atol=1e-5, rtol=1e-5)
    parents = torch.tensor([7, 3, 11, 0, 42])
    cond = drafter.conditional_logits(target, ours.hidden, parents)
    torch.testing.assert_close(cond.double(), _reference_conditional(sd, head, target, h, parents), atol=1e-5, rtol=1e-5)


def test_our_checkpoint_is_readable_in_the_public_layouts(tmp_path):
    """What we save loads as the public formats expect: z-lab names without a head, ETH names with one."""
    from safetensors import safe_open

    from treeflash.drafters import save_drafter

    from helpers import tiny_drafter

    target = tiny_target("qwen3")
    for head in (False, True):
        save_drafter(tiny_drafter(target, head=head), tmp_path / str(head))
        with safe_open(str(tmp_path / str(head) / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        config = json.loads((tmp_path / str(head) / "config.json").read_text())
        assert config["model_type"] == "qwen3" and config["block_size"] == 8 and config["rope_theta"] == THETA
        if head:
            assert "model.fc.weight" in keys and "ar_approximation.ug.bias" in keys
            assert config["treeflash_config"]["ar_approximation"] == "swiglu"
        else:
            assert "fc.weight" in keys and "layers.0.self_attn.q_norm.weight" in keys
            assert not any(k.startswith(("model.", "ar_")) for k in keys)


# -- `treeflash export` -------------------------------------------------------------------------------


def _vocab_drafter(target):
    from treeflash.drafters import new_drafter

    drafter = new_drafter(target, num_hidden_layers=2, block_size=8, target_layer_ids=(1, 2, 4),
                          mask_token_id=target.vocab_size - 1, ar_intermediate_size=48,
                          draft_vocab=torch.arange(5, 60))
    full = tiny_drafter(target)
    drafter.load_state_dict(full.state_dict() | {"draft_vocab": drafter.draft_vocab})
    return drafter


@pytest.mark.parametrize("fmt", ["vllm", "sglang", "zlab"])
def test_export_writes_the_engine_layout_and_drafts_what_it_drafted(fmt, tmp_path):
    from safetensors.torch import load_file

    from treeflash.export import export_drafter

    target = tiny_target("qwen3")
    drafter = tiny_drafter(target)  # with a TreeFlash head, full vocabulary
    report = export_drafter(drafter, tmp_path / fmt, fmt)
    assert report.dropped_head
    config = json.loads((tmp_path / fmt / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["block_size"] == 8 and config["num_target_layers"] == target.num_layers
    assert config["dflash_config"] == {"target_layer_ids": [1, 2, 4], "mask_token_id": target.vocab_size - 1}
    assert "treeflash_config" not in config and "draft_vocab_size" not in config
    weights = load_file(str(tmp_path / fmt / "model.safetensors"))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.0.self_attn.q_norm.weight",
            "layers.1.mlp.down_proj.weight"} <= set(weights)
    assert not any(k.startswith(("model.", "ar_approximation.", "lm_head", "embed")) for k in weights)
    loaded = load_drafter(tmp_path / fmt, target)
    assert loaded.ar_approximation is None
    feats = _features(target)
    ours = drafter.draft(target, 7, feats, drafter.new_cache(32))
    again = loaded.draft(target, 7, feats, loaded.new_cache(32))
    assert torch.equal(ours.logits, again.logits)  # the marginals: what a DFlash engine drafts from


def test_export_for_vllm_keeps_a_reduced_draft_vocabulary_as_lm_head_and_d2t(tmp_path):
    from safetensors.torch import load_file

    from treeflash.export import export_drafter

    target = tiny_target("llama")
    drafter = _vocab_drafter(target)
    report = export_drafter(drafter, tmp_path / "v", "vllm", target=target)
    assert report.draft_vocab_size == 55
    weights = load_file(str(tmp_path / "v" / "model.safetensors"))
    assert weights["lm_head.weight"].shape == (55, target.hidden_size)
    assert torch.equal(torch.arange(55) + weights["d2t"], torch.arange(5, 60))  # EAGLE-3's offsets
    torch.testing.assert_close(weights["lm_head.weight"], target.lm_head.weight[5:60].to(weights["lm_head.weight"]))
    assert json.loads((tmp_path / "v" / "config.json").read_text())["draft_vocab_size"] == 55
    loaded = load_drafter(tmp_path / "v", target)
    assert torch.equal(loaded.draft_vocab, drafter.draft_vocab)
    feats = _features(target)
    assert torch.equal(drafter.draft(target, 7, feats, drafter.new_cache(32)).logits,
                       loaded.draft(target, 7, feats, loaded.new_cache(32)).logits)
    with pytest.raises(TreeFlashError, match="not the target's LM head"):
        load_drafter(tmp_path / "v", tiny_target("llama", seed=9))


def test_export_refuses_what_an_engine_cannot_load(tmp_path):
    from treeflash.export import export_drafter

    target = tiny_target("llama")
    drafter = _vocab_drafter(target)
    with pytest.raises(TreeFlashError, match="SGLang drafts over the target's whole vocabulary.*--full-vocabulary"):
        export_drafter(drafter, tmp_path / "s", "sglang")
    with pytest.raises(TreeFlashError, match="pass --target"):
        export_drafter(drafter, tmp_path / "v", "vllm")
    with pytest.raises(TreeFlashError, match="unknown export format"):
        export_drafter(drafter, tmp_path / "x", "tensorrt")
    report = export_drafter(drafter, tmp_path / "s", "sglang", full_vocabulary=True)
    assert report.dropped_draft_vocab and load_drafter(tmp_path / "s", target).draft_vocab is None
    with pytest.raises(TreeFlashError, match="is not empty"):
        export_drafter(drafter, tmp_path / "s", "sglang", full_vocabulary=True)
