"""The GPU device check: the CUDA tests, a per-round cost profile on Qwen3-4B/8B-shaped targets, and the
speedups it projects, in one run of a few minutes (docs/gpu.md).

    PYTHONPATH=. python3 scripts/device_check.py --out $OUT          # one H100: about 3 minutes, at most 8
    PYTHONPATH=. python3 scripts/device_check.py --smoke --out DIR   # tiny shapes on the CPU, seconds

Targets are built in memory from the published Qwen3-4B and Qwen3-8B config.json shapes with random bf16
weights (nothing is downloaded), with a drafter of the public z-lab shape (5 layers, block 16, target layers
[1, 9, 17, 25, 33], mask token 151669) and a TreeFlash head. Random weights decide nothing about acceptance,
so each stage is timed on its own (synchronize, then perf_counter; warm-up first; median of --repeats): the
`ar` step, verification of trees of 1-256 entries (root included) with and without an 8-token lookup graft,
drafting, the head, the CPU-side tree search per method, commit, and transformers' own greedy `generate()`
step on the same model. The projected speedup of a method at a tree size is tau x (ar step / round time),
with tau from the DDTree paper's Qwen3-8B table (T = 0); it is a projection, not a measurement.

Writes device_check.json and device_check.md under --out, and prints the Markdown. --budget-seconds stops
starting new parts once that much time has passed (the report names what it skipped), so a slow card still
returns what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from treeflash.drafters import new_drafter
from treeflash.targets import Target
from treeflash.trees import (DraftTree, chain_tree, conditional_tree, graft_chain, marginal_tree, top_k_logprobs,
                             tree_attention_mask)
from treeflash.verification import SamplingConfig, choose_tokens

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Shape:
    """A target's shape (the fields of its config.json that set the cost) and the drafter read from it."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 40960
    rope_theta: float = 1e6
    drafter_layers: int = 5
    block_size: int = 16
    target_layer_ids: tuple[int, ...] = (1, 9, 17, 25, 33)
    mask_token_id: int = 151669

    def layer_params(self) -> int:
        """Weights of one decoder layer's projections (q, k, v, o and the MLP's three; norms are negligible)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        return h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 3 * h * i

    def weight_bytes(self, bytes_per_param: int = 2) -> int:
        """Bytes a one-token target pass reads: every layer's projections and the LM head (the embedding
        rows read are negligible)."""
        return bytes_per_param * (self.num_hidden_layers * self.layer_params() + self.vocab_size * self.hidden_size)


# Qwen/Qwen3-4B and Qwen/Qwen3-8B config.json (Hugging Face, 2025): 36 layers, 32 query and 8 key/value heads
# of 128, vocabulary 151936, rope_theta 1e6, 40960 positions; 4B ties its embedding, 8B does not.
SHAPES = {
    "qwen3-4b": Shape("Qwen3-4B", 2560, 9728, 36, 32, 8, 128, 151936, True),
    "qwen3-8b": Shape("Qwen3-8B", 4096, 12288, 36, 32, 8, 128, 151936, False),
}
SMOKE_SHAPE = Shape("tiny-qwen3", 64, 128, 6, 4, 2, 16, 512, True, max_position_embeddings=2048, drafter_layers=2,
                    block_size=8, target_layer_ids=(1, 2, 4), mask_token_id=511)

# tau (tokens per round, bonus included) on Qwen3-8B at T = 0, from the DDTree paper's table; DDTree's is at
# its best budget. TreeFlash reports +12% tau over DDTree.
PAPER_TAU = {"gsm8k": {"dflash": 6.57, "ddtree": 9.54}, "humaneval": {"dflash": 6.61, "ddtree": 9.67},
             "mtbench": {"dflash": 4.28, "ddtree": 6.58}}
TREEFLASH_GAIN = 1.12
TREE_SIZES = (1, 8, 16, 32, 64, 128, 256)  # tokens verified per round, the root included (ETH's tree_size)
LOOKUP = 8  # n-gram lookup tokens grafted onto a tree (DecodeConfig's default for the trees)
COMMITTED = 7  # tokens a round commits in the profile (about DFlash's tau on Qwen3-8B)


class Deadline:
    """Parts start only while time is left; what did not start is listed in the report."""

    def __init__(self, seconds: float):
        self.start, self.seconds, self.skipped = time.perf_counter(), seconds, []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, part: str, needs: float = 0.0) -> bool:
        if self.left() > needs:
            return True
        self.skipped.append(part)
        return False


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_ms(fn: Callable[[], object], sync: Callable[[], None], repeats: int, warmup: int) -> float:
    """Median wall time of fn() in milliseconds, each call ended by a device sync."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def build_target(shape: Shape, device: torch.device, dtype: torch.dtype) -> Target:
    """A Qwen3 model of `shape` with random weights, made directly on `device` in `dtype` (no float32 copy)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings, rope_theta=shape.rope_theta, rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tie_word_embeddings, eos_token_id=None, bos_token_id=None, pad_token_id=0,
    )
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(config, dtype=dtype)
    with torch.no_grad():  # one cheap normal init; norms keep their ones
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=generator)
    return Target(model, tokenizer=None, name=f"random {shape.name}")


def random_tree(size: int, vocab: int, seed: int) -> DraftTree:
    """A tree of `size` entries (root included) shaped like a best-first search's: each node under one of the
    nodes added shortly before it, so depth grows about logarithmically, up to DFlash's block."""
    g = torch.Generator().manual_seed(seed)
    parents, depths = [-1], [0]
    for i in range(1, size):
        p = int(torch.randint(max(0, i - 4), i, (1,), generator=g))
        while depths[p] >= 15:
            p = parents[p]
        parents.append(p)
        depths.append(depths[p] + 1)
    return DraftTree(torch.randint(0, vocab, (size,), generator=g), torch.tensor(parents), torch.tensor(depths),
                     torch.zeros(size))


def profile_shape(shape: Shape, device: torch.device, args: argparse.Namespace, deadline: Deadline) -> dict:
    """Stage times (ms) of one round on `shape`, and transformers' greedy step, on `device`."""
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    sync = synchronizer(device)
    ms = lambda fn: median_ms(fn, sync, args.repeats, args.warmup)  # noqa: E731
    started = time.perf_counter()
    target = build_target(shape, device, dtype)
    with torch.device(device):  # the drafter's weights are made on the device: a float32 copy on the host is slow
        drafter = new_drafter(target, num_hidden_layers=shape.drafter_layers, block_size=shape.block_size,
                              target_layer_ids=shape.target_layer_ids, mask_token_id=shape.mask_token_id)
    with torch.no_grad():  # a zero head would make TreeFlash's head rows free of meaning but not of cost
        drafter.ar_approximation.d.weight.normal_(0.0, 0.02)
    sync()
    result = {"shape": dataclasses.asdict(shape), "dtype": str(dtype).removeprefix("torch."),
              "weight_gb": shape.weight_bytes(dtype.itemsize) / 1e9, "build_seconds": time.perf_counter() - started}
    stages: dict = {}
    result["stages_ms"] = stages
    context, layers, greedy = args.context, drafter.config.target_layer_ids, SamplingConfig()
    capacity = context + max(TREE_SIZES) + LOOKUP + 1
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, shape.vocab_size, (context,), generator=g).to(device)
    with torch.inference_mode():
        target.pack()
        cache = target.new_cache(capacity)
        out = target.forward(prompt, torch.arange(context, device=device), cache, feature_layers=layers,
                             logits_rows=slice(context - 1, context))
        cache.advance(context)
        features = out.features  # [context, k*H]
        root = int(choose_tokens(out.logits, torch.tensor([context]), greedy)[0])

        def ar_step():  # one token after the context: the target pass and the token decision
            o = target.forward(torch.tensor([root], device=device), torch.tensor([context], device=device), cache)
            return int(choose_tokens(o.logits, torch.tensor([context + 1]), greedy)[0])

        stages["ar"] = ms(ar_step)

        def verify(tree: DraftTree) -> Callable[[], object]:
            positions = (context + tree.depths).to(device)
            mask = torch.ones(tree.tokens.shape[0], context + tree.tokens.shape[0], dtype=torch.bool, device=device)
            mask[:, context:] = tree_attention_mask(tree, device)
            tokens = tree.tokens.to(device)

            def run():
                o = target.forward(tokens, positions, cache, mask if tree.size else None, feature_layers=layers)
                return choose_tokens(o.logits, positions + 1, greedy).cpu()
            return run

        # Each size also with Target.expand_kv, the GPU-only choice of attention kernel for masked passes.
        stages["verify"], stages[f"verify_lookup{LOOKUP}"], stages["verify_expand_kv"] = {}, {}, {}
        for size in TREE_SIZES:
            if not deadline.allows(f"{shape.name} verify at {size}", 5):
                break
            tree = random_tree(size, shape.vocab_size, seed=size)
            stages["verify"][str(size)] = ms(verify(tree))
            grafted = graft_chain(tree, torch.randint(0, shape.vocab_size, (LOOKUP,), generator=g).tolist())
            stages[f"verify_lookup{LOOKUP}"][str(size)] = ms(verify(grafted))
            target.expand_kv = True
            stages["verify_expand_kv"][str(size)] = ms(verify(tree))
            target.expand_kv = False

        # Drafting: the block after the root, taking in the features of one round's committed tokens.
        dcache = drafter.new_cache(context + COMMITTED + shape.block_size)
        drafter.draft(target, root, features[: context - COMMITTED], dcache)
        dcache.crop(context - COMMITTED)
        new_features = features[context - COMMITTED:]  # [COMMITTED, k*H]

        def draft():
            block = drafter.draft(target, root, new_features, dcache)
            dcache.crop(context - COMMITTED)
            return block
        stages["draft"] = ms(draft)
        block = draft()

        # The head: TreeFlash's conditionals for the root and the top-m tokens of every marginal, all rows in one
        # pass as on a GPU (`tree_steps` with lazy_rows off), their top-k brought to the host for the search.
        m, k = drafter.config.candidate_tokens, 16
        parents = drafter.token_ids(block.logits[:-1].topk(m, dim=-1).indices)  # [D-1, m]
        hidden = torch.cat((block.hidden[:1], block.hidden[1:].repeat_interleave(m, dim=0)))  # [1 + (D-1)*m, H]
        rows = torch.cat((torch.tensor([root], device=device), parents.flatten()))

        def head():
            tokens, logprobs = top_k_logprobs(drafter.conditional_logits(target, hidden, rows), k)
            return parents.cpu(), drafter.token_ids(tokens).cpu(), logprobs.cpu()
        stages["head"] = ms(head)
        head_rows = head()
        marginal_top = [t.cpu() for t in top_k_logprobs(block.logits, max(TREE_SIZES))]  # [D, 256] each
        chain_top = [t.cpu() for t in top_k_logprobs(block.logits, 1)]

        # Tree search (on the host) and the verify input it compiles (mask and positions, on the device).
        def tree_stage(method: str, budget: int) -> Callable[[], object]:
            def run():
                if method == "dflash":
                    tree = chain_tree(root, chain_top[0][:, 0], chain_top[1][:, 0], budget)
                elif method == "ddtree":
                    tree = marginal_tree(root, marginal_top[0][:, :budget], marginal_top[1][:, :budget], budget)
                else:
                    tree = conditional_tree(root, *head_rows, budget)
                mask = torch.ones(tree.tokens.shape[0], context + tree.tokens.shape[0], dtype=torch.bool,
                                  device=device)
                mask[:, context:] = tree_attention_mask(tree, device)
                return mask, (context + tree.depths).to(device), tree.tokens.to(device)
            return run

        stages["tree"] = {"dflash": {str(shape.block_size): ms(tree_stage("dflash", shape.block_size - 1))},
                          "ddtree": {}, "treeflash": {}}
        for method in ("ddtree", "treeflash"):
            for size in TREE_SIZES[1:]:
                stages["tree"][method][str(size)] = ms(tree_stage(method, size - 1))

        # Commit: keep the accepted path's keys/values and features.
        keep = torch.arange(COMMITTED, device=device)
        verify_out = target.forward(prompt[:COMMITTED], context + torch.arange(COMMITTED, device=device), cache,
                                    feature_layers=layers)

        def commit():
            cache.compact(torch.tensor(list(range(COMMITTED)), device=device))
            cache.crop(context)
            return verify_out.features[keep]
        stages["commit"] = ms(commit)

    if deadline.allows(f"{shape.name} transformers generate", 20):
        stages["hf_generate_step"] = hf_generate_step(target.model, prompt, sync, args)
    result["rounds_ms"] = round_times(stages, shape.block_size)
    result["projection"] = projection(stages["ar"], result["rounds_ms"])
    return result


@torch.inference_mode()
def hf_generate_step(model, prompt: torch.Tensor, sync: Callable[[], None], args: argparse.Namespace) -> float:
    """transformers' greedy generate(), ms per new token: the difference of two lengths, so the prefill cancels."""
    ids = prompt[None]

    def run(n: int) -> Callable[[], object]:
        return lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
    short, long = 2, 2 + args.generate_tokens
    repeats = max(1, args.repeats // 4)
    t_short = median_ms(run(short), sync, repeats, 1)
    t_long = median_ms(run(long), sync, repeats, 1)
    return max(t_long - t_short, 1e-6) / (long - short)


def round_times(stages: dict, block_size: int) -> dict:
    """One round's time (ms) per method and tree size: draft + head (TreeFlash) + tree + verify + commit."""
    fixed = stages["draft"] + stages["commit"]
    verify, tree = stages["verify"], stages["tree"]
    rounds = {}
    size = str(block_size)
    if size in verify:
        rounds["dflash"] = {size: fixed + tree["dflash"][size] + verify[size]}
    for method in ("ddtree", "treeflash"):
        head = stages["head"] if method == "treeflash" else 0.0
        rounds[method] = {s: fixed + head + tree[method][s] + verify[s] for s in tree[method] if s in verify}
    return rounds


def projection(ar_ms: float, rounds: dict) -> dict:
    """PROJECTED speedup over our ar step: tau x (ar step / round time), tau from PAPER_TAU (Qwen3-8B, T = 0)."""
    out = {}
    for dataset, taus in PAPER_TAU.items():
        tau = {"dflash": taus["dflash"], "ddtree": taus["ddtree"], "treeflash": taus["ddtree"] * TREEFLASH_GAIN}
        out[dataset] = {method: {s: tau[method] * ar_ms / t for s, t in sizes.items()}
                        for method, sizes in rounds.items()}
    return out


def run_cuda_tests(timeout: float) -> dict:
    """`pytest -q -rs -k cuda tests/` in a subprocess, its summary kept."""
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-k", "cuda", "tests/"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        output, code = output + f"\n[device_check] stopped after {timeout:.0f} s", None
    lines = output.strip().splitlines()
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|deselected|error)",
                                                                  line)), lines[-1] if lines else "")
    return {"command": " ".join(command), "returncode": code, "seconds": time.perf_counter() - started,
            "summary": summary.strip("= "), "tail": "\n".join(lines[-40:])}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


def markdown(report: dict) -> str:
    lines = [f"# Device check: {report['device']}", "",
             f"{report['date']}; torch {report['torch']}, transformers {report['transformers']}, Python "
             f"{report['python']}. Command: `{report['command']}`. Context {report['settings']['context']} tokens, "
             f"median of {report['settings']['repeats']} after {report['settings']['warmup']} warm-up.", ""]
    for key, r in report["shapes"].items():
        s = r["stages_ms"]
        lines += [f"## {r['shape']['name']} shape, random {r['dtype']} weights ({r['weight_gb']:.1f} GB read per "
                  f"one-token pass; built in {r['build_seconds']:.1f} s)", "",
                  "Stage times, ms: ar = one target step with its token decision; hf = transformers' greedy "
                  "generate() per token; draft = one drafter block; head = every TreeFlash head row in one pass.",
                  "", "| ar | hf generate | draft | head | commit |", "|---|---|---|---|---|",
                  f"| {s['ar']:.2f} | {_cell(s.get('hf_generate_step'))} | {s['draft']:.2f} | {s['head']:.2f} "
                  f"| {s['commit']:.3f} |", "",
                  f"| tree size (root included) | verify | verify + lookup {LOOKUP} | verify, expand_kv | ddtree tree "
                  "| treeflash tree |", "|---|---|---|---|---|---|"]
        for size, t in s["verify"].items():
            lines.append(f"| {size} | {t:.2f} | {s[f'verify_lookup{LOOKUP}'][size]:.2f} "
                         f"| {s['verify_expand_kv'][size]:.2f} "
                         f"| {_cell(s['tree']['ddtree'].get(size))} | {_cell(s['tree']['treeflash'].get(size))} |")
        lines += ["", "**Projection, not a measurement**: speedup = tau x (ar step / round time), tau from the DDTree "
                  "paper's Qwen3-8B table at T = 0 (DDTree's at its best budget, so smaller trees are flattered; "
                  f"TreeFlash = DDTree x {TREEFLASH_GAIN}). Round = draft + head + tree + verify + commit.", "",
                  "| method | tree size | round ms | " + " | ".join(f"{d} (tau)" for d in PAPER_TAU) + " |",
                  "|---|---|---|" + "---|" * len(PAPER_TAU)]
        for method, sizes in r["rounds_ms"].items():
            for size, t in sizes.items():
                cells = []
                for d, taus in PAPER_TAU.items():
                    tau = taus["dflash"] if method == "dflash" else taus["ddtree"] * (
                        TREEFLASH_GAIN if method == "treeflash" else 1.0)
                    cells.append(f"{r['projection'][d][method][size]:.2f}x ({tau:.2f})")
                lines.append(f"| {method} | {size} | {t:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    tests = report.get("cuda_tests")
    lines += ["## CUDA tests", "", f"`{tests['command']}`: {tests['summary']} ({tests['seconds']:.0f} s)"
              if tests else "Not run (--smoke or --no-tests)."]
    if report["skipped"]:
        lines += ["", f"**Skipped for time** (--budget-seconds {report['settings']['budget_seconds']}): "
                  + "; ".join(report["skipped"])]
    lines += ["", f"Total {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# H100 SXM, dense bf16 tensor-core peak and HBM3 bandwidth (NVIDIA's data sheet), for the dry estimate.
H100_FLOPS, H100_BYTES_PER_S = 990e12, 3.35e12


def pass_seconds(shape: Shape, params: int, rows: int, attended: int, host_ms_per_layer: float, layers: int,
                 efficiency: float) -> float:
    """A pass of `rows` tokens over `params` bf16 weights, each row attending `attended` keys in `layers` layers:
    the roofline max(bytes / bandwidth, FLOPs / peak) at `efficiency` of both, plus host time per layer."""
    flops = 2 * params * rows + 4 * rows * attended * shape.num_attention_heads * shape.head_dim * layers
    roofline = max(2 * params / H100_BYTES_PER_S, flops / H100_FLOPS) / efficiency
    return roofline + layers * host_ms_per_layer / 1000


def dry_estimate(smoke: dict, repeats: int = 20, warmup: int = 3, context: int = 512, generate_tokens: int = 32,
                 tests_seconds: float = 60.0) -> dict:
    """How long the full check takes on one H100, from the shapes, the passes it makes (with the default
    settings) and the CPU smoke report `smoke`: host time per layer = the smoke's ar step / its layers (this
    CPU dispatching tiny ops, more than a GPU box's CPU spends launching kernels), tree search = the smoke's x 2
    (its block has half the depths). Two bounds: the roofline at 100% with that host time, and at 50% with
    twice it. Build times are measured here, on the meta device (Python construction only)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tiny = smoke["shapes"]["tiny"]
    host_per_layer = tiny["stages_ms"]["ar"] / tiny["shape"]["num_hidden_layers"]
    tree_ms = 2 * sum(t for method in tiny["stages_ms"]["tree"].values() for t in method.values())
    calls = repeats + warmup
    rows = {}
    for key, shape in SHAPES.items():
        h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
        layer, lm_head = shape.layer_params(), v * h
        target = shape.weight_bytes(1)  # parameters a pass reads
        drafter = shape.drafter_layers * layer + len(shape.target_layer_ids) * h * h + lm_head
        head = 4 * h * i + i * h + lm_head
        head_rows = 1 + (shape.block_size - 2) * 16  # the root's row and m = 16 per inner depth
        target_passes = ([(context, context, 1)] + [(1, context + 1, calls)]
                         + [(n, context + n, calls) for n in TREE_SIZES]
                         + [(n + LOOKUP, context + n + LOOKUP, calls) for n in TREE_SIZES]
                         + [(n, context + n, calls) for n in TREE_SIZES] + [(COMMITTED, context + COMMITTED, 1)])
        generate_runs = 1 + max(1, repeats // 4)
        target_passes += [(context, context, 2 * generate_runs),  # transformers' prefills, then its steps
                          (1, context + 16, generate_runs * (2 + 2 + generate_tokens))]
        drafter_passes = [(context, context, 1), (shape.block_size + COMMITTED, context + shape.block_size, calls + 1)]
        bounds = []
        for efficiency, host in ((1.0, host_per_layer), (0.5, 2 * host_per_layer)):
            total = sum(count * pass_seconds(shape, target, n, attended, host, shape.num_hidden_layers, efficiency)
                        for n, attended, count in target_passes)
            total += sum(count * pass_seconds(shape, drafter, n, attended, host, shape.drafter_layers, efficiency)
                         for n, attended, count in drafter_passes)
            total += (calls + 1) * pass_seconds(shape, head, head_rows, 0, host, 2, efficiency)
            total += calls * tree_ms / 1000 * (1 if efficiency == 1.0 else 2)
            bounds.append(total)
        config = Qwen3Config(vocab_size=v, hidden_size=h, intermediate_size=i,
                             num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
                             num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
                             tie_word_embeddings=shape.tie_word_embeddings)
        started = time.perf_counter()
        with torch.device("meta"):
            Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16)
        build = time.perf_counter() - started
        one_token = 2 * target / H100_BYTES_PER_S
        verify_256 = max(one_token, 2 * target * 256 / H100_FLOPS)
        rows[key] = {"name": shape.name, "target_params_b": target / 1e9, "weight_gb": 2 * target / 1e9,
                     "drafter_params_b": drafter / 1e9, "flops_per_token_g": 2 * target / 1e9,
                     "ar_step_roofline_ms": 1000 * one_token, "verify_256_roofline_ms": 1000 * verify_256,
                     "target_tokens": sum(n * c for n, _, c in target_passes),
                     "target_passes": sum(c for _, _, c in target_passes),
                     "drafter_passes": sum(c for _, _, c in drafter_passes), "head_passes": calls + 1,
                     "build_seconds_meta_here": build, "timed_seconds": bounds}
    startup = 15.0  # Python, torch and transformers imports, CUDA context and cuBLAS handles
    low = startup + tests_seconds + sum(r["timed_seconds"][0] + r["build_seconds_meta_here"] for r in rows.values())
    high = startup + 2 * tests_seconds + sum(r["timed_seconds"][1] + 4 * r["build_seconds_meta_here"] + 10
                                             for r in rows.values())
    return {"host_ms_per_layer": host_per_layer, "tree_ms_per_call_set": tree_ms, "shapes": rows,
            "startup_seconds": startup, "tests_seconds": [tests_seconds, 2 * tests_seconds],
            "total_seconds": [low, high], "limit_seconds": 480}


def estimate_markdown(e: dict) -> str:
    lines = ["| shape | bf16 weights | FLOPs per token | ar step roofline | verify 256 roofline "
             "| target passes (tokens) | drafter / head passes | build (meta, here) | timed part |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in e["shapes"].values():
        lines.append(f"| {r['name']} | {r['weight_gb']:.1f} GB | {r['flops_per_token_g']:.1f} G | "
                     f"{r['ar_step_roofline_ms']:.2f} ms | {r['verify_256_roofline_ms']:.2f} ms | "
                     f"{r['target_passes']} ({r['target_tokens']}) | {r['drafter_passes']} / {r['head_passes']} | "
                     f"{r['build_seconds_meta_here']:.1f} s "
                     f"| {r['timed_seconds'][0]:.0f}-{r['timed_seconds'][1]:.0f} s |")
    low, high = e["total_seconds"]
    lines += ["", f"Host time per layer (the CPU smoke run's ar step / its layers): {e['host_ms_per_layer']:.2f} ms. "
              f"Start-up {e['startup_seconds']:.0f} s, CUDA tests "
              f"{e['tests_seconds'][0]:.0f}-{e['tests_seconds'][1]:.0f} s. "
              f"**Total: {low / 60:.1f}-{high / 60:.1f} minutes** against the {e['limit_seconds'] / 60:.0f} allowed."]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "device_check.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for device_check.json and device_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds), no CUDA tests")
    parser.add_argument("--estimate", action="store_true",
                        help="with --smoke: also write the dry estimate of the full check on one H100 (estimate.md)")
    parser.add_argument("--shapes", default="qwen3-4b,qwen3-8b", help="comma-separated: qwen3-4b, qwen3-8b")
    parser.add_argument("--no-tests", action="store_true", help="skip the CUDA tests (pytest -k cuda)")
    parser.add_argument("--tests-timeout", type=float, default=240, help="seconds the CUDA tests may take")
    parser.add_argument("--budget-seconds", type=float, default=450,
                        help="start no new part after this many seconds (default 450, under the 8 minutes a device "
                             "call allows); the report names what it skipped")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="weights and caches (default bfloat16; smoke float32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per stage (default 20; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; smoke 1)")
    parser.add_argument("--context", type=int, default=None, help="committed tokens before the round (default 512; "
                                                                   "smoke 32)")
    parser.add_argument("--generate-tokens", type=int, default=None,
                        help="extra tokens of the longer transformers generate() (default 32; smoke 4)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.dtype = args.dtype or ("float32" if smoke else "bfloat16")
    args.repeats = args.repeats or (3 if smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.context = args.context or (32 if smoke else 512)
    args.generate_tokens = args.generate_tokens or (4 if smoke else 32)
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    deadline = Deadline(args.budget_seconds)
    import transformers

    report = {
        "command": "python3 scripts/device_check.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "smoke": smoke,
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "context": args.context,
                     "budget_seconds": args.budget_seconds, "tree_sizes": list(TREE_SIZES), "lookup": LOOKUP,
                     "committed_per_round": COMMITTED},
        "paper_tau": PAPER_TAU, "treeflash_gain": TREEFLASH_GAIN,
        "shapes": {}, "cuda_tests": None, "skipped": deadline.skipped, "seconds": 0.0,
    }
    if device.type != "cuda" and not smoke:
        print("[device_check] no GPU here: profiling on the CPU (use --smoke for the tiny shapes)", file=sys.stderr)
    shapes = {"tiny": SMOKE_SHAPE} if smoke else {k: SHAPES[k] for k in args.shapes.split(",")}
    for key, shape in shapes.items():
        if deadline.allows(f"{shape.name} profile", 30 if not smoke else 0):
            report["shapes"][key] = profile_shape(shape, device, args, deadline)
            gc.collect()  # the model is gone with profile_shape's frame; hand its memory to the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report["seconds"] = time.perf_counter() - deadline.start
            write(report, args.out)  # a kill later still leaves this much
    if not smoke and not args.no_tests and deadline.allows("CUDA tests", 30):
        report["cuda_tests"] = run_cuda_tests(min(args.tests_timeout, deadline.left()))
    report["seconds"] = time.perf_counter() - deadline.start
    print(write(report, args.out))
    if args.estimate and report["shapes"]:
        text = estimate_markdown(dry_estimate(report))
        (args.out / "estimate.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
