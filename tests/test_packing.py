"""Packed linear maps (treeflash.packing): the same numbers as F.linear, in the target and the drafter."""

import pytest
import torch
import torch.nn.functional as F

from treeflash.packing import FusedLinear, packing_backend

from helpers import tiny_drafter, tiny_target

needs_mkl = pytest.mark.skipif(packing_backend(torch.zeros(1, 1)) != "mkl", reason="this torch build cannot pack")


@needs_mkl
@pytest.mark.parametrize("rows", [0, 1, 3, 16, 65])
def test_fused_packed_map_equals_separate_linears(rows):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, 24, generator=g) for n in (40, 8, 8)]
    biases = [torch.randn(40, generator=g), None, torch.randn(8, generator=g)]
    fused = FusedLinear(weights, biases)
    assert fused.backend == "mkl"
    x = torch.randn(rows, 24, generator=g)
    for got, w, b in zip(fused.split(x), weights, biases):
        assert got.shape == (rows, w.shape[0])
        torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_bfloat16_packed_map_equals_linear():
    w = torch.randn(48, 32).bfloat16()
    single = FusedLinear([w])
    x = torch.randn(5, 2, 32).bfloat16()  # leading dims are kept
    torch.testing.assert_close(single(x).float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2)
    with pytest.raises(TypeError, match="several outputs"):
        FusedLinear([w, w])(x)


def test_unpacked_maps_keep_gradients_and_do_not_copy():
    w = torch.randn(6, 4, requires_grad=True)
    m = FusedLinear([w], pack=False)
    assert m.backend is None
    m(torch.randn(3, 4)).sum().backward()
    assert w.grad is not None
    assert FusedLinear([torch.randn(6, 4, dtype=torch.float64)]).backend is None  # nothing packs float64


@needs_mkl
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_packed_target_matches_its_unpacked_self(family):
    packed = tiny_target(family, dtype=torch.float32)
    plain = tiny_target(family, dtype=torch.float32)
    assert plain.maps[0].qkv.backend is None  # packing waits for the first tree (Target.pack)
    packed.pack()
    assert packed.maps[0].qkv.backend == "mkl" and packed.lm_head_map.backend == "mkl"
    ids = torch.randint(0, packed.vocab_size, (19,), generator=torch.Generator().manual_seed(2))
    a = packed.forward(ids, torch.arange(19), packed.new_cache(32), feature_layers=(1, 3))
    b = plain.forward(ids, torch.arange(19), plain.new_cache(32), feature_layers=(1, 3))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.features, b.features, atol=1e-4, rtol=1e-4)


@needs_mkl
def test_drafter_packs_for_inference_and_repacks_when_its_weights_change():
    target = tiny_target("llama", dtype=torch.float32)
    drafter = tiny_drafter(target)
    features = torch.randn(9, 3 * target.hidden_size, generator=torch.Generator().manual_seed(4))

    def draft():
        cache = drafter.new_cache(32)
        return drafter.draft(target, 5, features, cache)

    first = draft()
    assert drafter.maps().q[0].backend is None  # gradients on: the live modules
    with torch.no_grad():
        assert drafter.maps().q[0].backend == "mkl"
        with torch.enable_grad():  # the same numbers through the modules, as training sees them
            cache = drafter.new_cache(32)
            reference = drafter.forward_block(
                target.embed_tokens(torch.tensor([5] + [drafter.config.mask_token_id] * 7)),
                torch.arange(9, 17), drafter.fuse(features), torch.arange(9), cache)
        torch.testing.assert_close(first.hidden, reference[1:].detach(), atol=1e-4, rtol=1e-4)
        drafter.layers[0].mlp.down_proj.weight.mul_(2.0)
    second = draft()
    assert not torch.allclose(first.hidden, second.hidden)  # the packed copy followed the change
