"""Packed linear maps (treeflash.packing): the same numbers as F.linear, in the target and the drafter."""

import pytest
import torch
import torch.nn.functional as F

from treeflash.errors import TreeFlashError
from treeflash.packing import FusedLinear, float32_backend, packing_backend

from helpers import tiny_drafter, tiny_target

needs_packing = pytest.mark.skipif(packing_backend(torch.zeros(1, 1)) is None, reason="this torch build cannot pack")


def _available(backend: str) -> bool:
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TREEFLASH_CPU_GEMM", backend)
        return float32_backend() == backend


# Both float32 libraries, whichever this processor would pick by default.
FLOAT32_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _available(b), reason=f"this torch has no {b}"))
                    for b in ("mkl", "onednn")]


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("rows", [0, 1, 3, 16, 65])
def test_fused_packed_map_equals_separate_linears(rows, backend, monkeypatch):
    monkeypatch.setenv("TREEFLASH_CPU_GEMM", backend)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, 24, generator=g) for n in (40, 8, 8)]
    biases = [torch.randn(40, generator=g), None, torch.randn(8, generator=g)]
    fused = FusedLinear(weights, biases)
    assert fused.backend == backend
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


def test_the_float32_library_follows_the_processor_unless_the_environment_names_one(monkeypatch):
    import treeflash.packing as packing

    monkeypatch.delenv("TREEFLASH_CPU_GEMM", raising=False)
    for vendor, expected in (("GenuineIntel", "mkl"), ("AuthenticAMD", "onednn"), ("", "onednn")):
        monkeypatch.setattr(packing, "cpu_vendor", lambda v=vendor: v)
        if _available(expected):
            assert float32_backend() == expected, vendor
    monkeypatch.setenv("TREEFLASH_CPU_GEMM", "plain")
    assert float32_backend() is None and FusedLinear([torch.randn(6, 4)]).backend is None
    monkeypatch.setenv("TREEFLASH_CPU_GEMM", "blas")
    with pytest.raises(TreeFlashError, match="TREEFLASH_CPU_GEMM must be one of mkl, onednn, plain; got 'blas'"):
        FusedLinear([torch.randn(6, 4)])


def test_unpacked_maps_keep_gradients_and_do_not_copy():
    w = torch.randn(6, 4, requires_grad=True)
    m = FusedLinear([w], pack=False)
    assert m.backend is None
    m(torch.randn(3, 4)).sum().backward()
    assert w.grad is not None
    assert FusedLinear([torch.randn(6, 4, dtype=torch.float64)]).backend is None  # nothing packs float64


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_packed_target_matches_its_unpacked_self(family, backend, monkeypatch):
    monkeypatch.setenv("TREEFLASH_CPU_GEMM", backend)
    packed = tiny_target(family, dtype=torch.float32)
    plain = tiny_target(family, dtype=torch.float32)
    assert plain.maps[0].qkv.backend is None  # packing waits for the first tree (Target.pack)
    packed.pack()
    assert packed.maps[0].qkv.backend == backend and packed.lm_head_map.backend == backend
    ids = torch.randint(0, packed.vocab_size, (19,), generator=torch.Generator().manual_seed(2))
    a = packed.forward(ids, torch.arange(19), packed.new_cache(32), feature_layers=(1, 3))
    b = plain.forward(ids, torch.arange(19), plain.new_cache(32), feature_layers=(1, 3))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.features, b.features, atol=1e-4, rtol=1e-4)


@needs_packing
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
        assert drafter.maps().q[0].backend == float32_backend()
        with torch.enable_grad():  # the same numbers through the modules, as training sees them
            cache = drafter.new_cache(32)
            reference = drafter.forward_block(
                target.embed_tokens(torch.tensor([5] + [drafter.config.mask_token_id] * 7)),
                torch.arange(9, 17), drafter.fuse(features), torch.arange(9), cache)
        torch.testing.assert_close(first.hidden, reference[1:].detach(), atol=1e-4, rtol=1e-4)
        drafter.layers[0].mlp.down_proj.weight.mul_(2.0)
    second = draft()
    assert not torch.allclose(first.hidden, second.hidden)  # the packed copy followed the change


def test_the_processor_is_named_from_cpuinfo(monkeypatch):
    import treeflash.machine as machine

    monkeypatch.setattr(machine, "cpuinfo", lambda: {"vendor_id": "AuthenticAMD", "model name": "AMD EPYC"})
    assert machine.cpu_model() == "AMD EPYC" and machine.cpu_vendor() == "AuthenticAMD"
    monkeypatch.setattr(machine, "cpuinfo", lambda: {"hardware": "BCM2835"})  # ARM boards
    assert machine.cpu_model() == "BCM2835"
    monkeypatch.setattr(machine, "cpuinfo", lambda: {})  # no /proc/cpuinfo: still a name
    assert machine.cpu_model()
    monkeypatch.setattr(machine, "cpuinfo", lambda: {"flags": "fpu avx512f amx_bf16 amx_tile"})
    assert machine.cpu_has_amx()
    monkeypatch.setattr(machine, "cpuinfo", lambda: {"flags": "fpu avx2"})
    assert not machine.cpu_has_amx()
