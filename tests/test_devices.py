"""The lossless contract and a training step on every device this machine has: the CPU always, and CUDA where
a GPU is present (skipped elsewhere). The same test bodies run on both, so the CPU runs check the tests
themselves. Tree attention against causal attention runs on every device in test_targets.py. On a GPU,
`pytest -rs -k cuda` is the first thing to run."""

import pytest
import torch

from treeflash.decoding import METHODS, DecodeConfig, Decoder
from treeflash.train.config import TrainConfig
from treeflash.train.loop import train
from treeflash.train.records import Sequence

from helpers import DEVICES, greedy_reference, needs_default_model, tiny_drafter, tiny_target

PROMPT = [5, 17, 33, 2, 71, 8, 40]


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_method_equals_ar_greedy_and_sampled(device, dtype):
    target = tiny_target("qwen3", dtype=dtype, device=device)
    decoder = Decoder(target, tiny_drafter(target))
    reference = decoder.generate(PROMPT, DecodeConfig(method="ar", max_new_tokens=40)).token_ids
    assert reference == greedy_reference(target, PROMPT, 40)
    sampled = dict(max_new_tokens=32, temperature=0.9, top_p=0.95, seed=3)
    sampled_reference = decoder.generate(PROMPT, DecodeConfig(method="ar", **sampled)).token_ids
    for method in METHODS[1:]:
        for budget, lookup in ((1, 0), (24, 0), (5, 8)):
            config = DecodeConfig(method=method, budget=budget, lookup=lookup, max_new_tokens=40)
            assert decoder.generate(PROMPT, config).token_ids == reference, (method, budget, lookup)
        config = DecodeConfig(method=method, budget=12, **sampled)
        assert decoder.generate(PROMPT, config).token_ids == sampled_reference, method


def test_batched_generation_equals_one_at_a_time(device):
    target = tiny_target("llama", dtype=torch.float64, device=device)
    decoder = Decoder(target, tiny_drafter(target))
    prompts = [PROMPT, PROMPT[:3], [9, 1, 4, 4, 60]]
    for method in METHODS:
        config = DecodeConfig(method=method, budget=6, max_new_tokens=24)
        batched = decoder.generate_batch(prompts, config)
        assert [r.token_ids for r in batched] == [decoder.generate(p, config).token_ids for p in prompts], method


def test_a_training_step_and_its_validation_run(device, tmp_path):
    target = tiny_target("llama", dtype=torch.float32, device=device)
    g = torch.Generator().manual_seed(0)
    sequences = []
    for i in range(4):
        prompt = torch.randint(0, target.vocab_size - 1, (4,), generator=g).tolist()
        sequences.append(Sequence(f"s{i}", prompt + greedy_reference(target, prompt, 20), prompt_length=4))
    drafter = tiny_drafter(target, block_size=4, head=True, random_head=False)
    before = [p.detach().clone() for p in drafter.parameters()]
    config = TrainConfig(stage="head", finetune_backbone=True, epochs=1, anchors=4, batch_size=2, val_sequences=1,
                         eval_every=1000, save_every=1000)
    metrics = train(drafter, target, sequences, config, tmp_path / "run", max_steps=2, progress=False,
                    log=lambda m: None)
    assert metrics["step"] == 2 and 1.0 <= metrics["conditional_chain_tau"] <= 4.0  # block 4
    assert any(not torch.equal(a, b) for a, b in zip(before, drafter.parameters()))
    assert all(p.device.type == device for p in drafter.parameters())


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU (test_default_model.py runs this on the CPU)")
@needs_default_model
def test_the_default_model_and_shipped_drafter_on_cuda_equal_ar():
    """The real default target (float32) and the shipped drafter on a GPU, every method with and without
    lookup. (In bfloat16 a tree pass and a one-token pass round differently, so genuine near-ties may go
    either way: exactness is a float32 contract, as on the CPU.)"""
    from treeflash.api import resolve_drafter
    from treeflash.targets import load_target

    target = load_target(device="cuda")
    decoder = Decoder(target, resolve_drafter(None, target))
    ids = target.encode_prompt("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"", chat=False)
    reference = decoder.generate(ids, DecodeConfig(method="ar", max_new_tokens=64, stop_at_eos=False)).token_ids
    for method in METHODS[1:]:
        for budget, lookup in ((32, 0), (4, 8)):
            result = decoder.generate(ids, DecodeConfig(method=method, budget=budget, lookup=lookup, max_new_tokens=64,
                                                        stop_at_eos=False))
            assert result.token_ids == reference, (method, budget, lookup)
