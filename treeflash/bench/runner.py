"""Running a benchmark: what it runs (`BenchConfig`), and every variant on every prompt, interleaved, timed
(`run_bench`). The numbers it records are defined in `treeflash.bench.metrics`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tqdm.auto import tqdm

from ..decoding import DEFAULT_LOOKUP, METHODS, DecodeConfig, Decoder
from ..errors import TreeFlashError
from ..trees import check_budget
from .baselines import hf_generate
from .metrics import BASELINES, HF_GENERATE, HF_PROMPT_LOOKUP, PeakMemory, Run, variant_label

DEFAULT_DATASETS = ("mtbench", "humaneval", "sharegpt-heldout")
WARMUP_TOKENS = 32  # new tokens per warm-up generation: enough for lazy initialisation, cheap on a CPU


@dataclasses.dataclass
class BenchConfig:
    """What `treeflash bench` runs. Flags map one-to-one onto these fields."""

    # methods to time; ar always runs: it is every speedup's and every agreement's reference
    methods: tuple[str, ...] = METHODS
    budgets: tuple[int, ...] = (16, 32, 64, 128)  # node budgets for ddtree and treeflash, the root not counted
    # n-gram lookup lengths for ddtree and treeflash, each a series of its own; 0 = off (by default off and
    # DecodeConfig's default, so that both the paper's trees and `treeflash generate` are measured)
    lookups: tuple[int, ...] = tuple(sorted({0, DEFAULT_LOOKUP.get("treeflash", 0)}))
    lookup_ngram: int = DecodeConfig.lookup_ngram  # the shortest context suffix a lookup matches, 1-4
    # mtbench (first turns), humaneval, sharegpt-heldout (`treeflash.train.prompts`), or JSONL paths
    datasets: tuple[str, ...] = DEFAULT_DATASETS
    prompts: int = 10  # prompts per dataset (the first ones)
    max_new_tokens: int = 256  # per generation; EOS also stops every variant
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0  # sampling seed, the same for every variant
    warmup: int = 1  # untimed short generations of each variant first (WARMUP_TOKENS tokens each)
    hf_baselines: bool = True  # also time transformers generate and its prompt-lookup decoding
    prompt_lookup_tokens: int = 10  # hf-prompt-lookup candidate tokens per round
    chat: bool = True  # prompts as one user turn of the chat template, not as raw text
    analyses: bool = False  # also write plots and the teacher-forced draft analyses (needs matplotlib: the bench extra)
    analysis_prompts: int = 4  # prompts for the teacher-forced analyses
    anchors: int = 16  # anchors drafted per analysed prompt
    draw_budget: int = 24  # nodes of the drawn DDTree and TreeFlash trees

    def __post_init__(self):
        self.methods = tuple(dict.fromkeys(("ar", *self.methods)))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise TreeFlashError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        self.budgets = tuple(sorted({check_budget(b) for b in self.budgets}))
        if not self.budgets:
            raise TreeFlashError("give at least one budget, e.g. --budgets 16,32,64")
        if not self.lookups or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.lookups):
            raise TreeFlashError(f"lookups must be whole numbers >= 0 (0 = off), e.g. --lookups 0,8; got {self.lookups!r}")
        self.lookups = tuple(sorted(set(self.lookups)))
        if not self.datasets:
            raise TreeFlashError("give at least one dataset, e.g. --datasets mtbench")
        for name, value, least in (("prompts", self.prompts, 1), ("max_new_tokens", self.max_new_tokens, 1),
                                   ("warmup", self.warmup, 0), ("prompt_lookup_tokens", self.prompt_lookup_tokens, 1),
                                   ("analysis_prompts", self.analysis_prompts, 1), ("anchors", self.anchors, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise TreeFlashError(f"{name} must be a whole number >= {least}; got {value!r}")
        check_budget(self.draw_budget)
        DecodeConfig(temperature=self.temperature, seed=self.seed, lookup_ngram=self.lookup_ngram)  # validates them

    def variants(self) -> list[tuple[str, int | None, int]]:
        """(method, budget, lookup) in the order each prompt runs them; budget None = the method's own
        (dflash). ar, dflash and the baselines run without lookup: they are the references."""
        out: list[tuple[str, int | None, int]] = [("ar", 0, 0)]
        if self.hf_baselines:
            out += [(HF_GENERATE, 0, 0), (HF_PROMPT_LOOKUP, self.prompt_lookup_tokens, 0)]
        for method in self.methods[1:]:
            out += [(method, None, 0)] if method == "dflash" else [
                (method, b, lookup) for lookup in self.lookups for b in self.budgets]
        return out


def dataset_label(source: str) -> str:
    """A dataset's name in tables: the name itself, or a JSONL file's stem."""
    return source if source in DEFAULT_DATASETS or source == "sharegpt" else Path(source).stem


def _generate(decoder: Decoder, method: str, budget: int | None, lookup: int, prompt_ids: list[int],
              config: BenchConfig, max_new_tokens: int, dataset: str, prompt_id: str) -> Run:
    if method in BASELINES:
        tokens, seconds, stop = hf_generate(
            decoder.target.model, prompt_ids, max_new_tokens, decoder.target.eos_token_ids, config.temperature,
            config.seed, prompt_lookup_tokens=budget if method == HF_PROMPT_LOOKUP else None)
        return Run(dataset, prompt_id, method, budget, len(prompt_ids), tokens, seconds, stop)
    result = decoder.generate(prompt_ids, DecodeConfig(method=method, budget=budget or None,
                                                       max_new_tokens=max_new_tokens, lookup=lookup,
                                                       lookup_ngram=config.lookup_ngram,
                                                       temperature=config.temperature, seed=config.seed))
    return Run(dataset, prompt_id, method, result.budget, len(prompt_ids), list(result.token_ids), result.seconds,
               result.stop_reason, rounds=result.rounds, acceptance_lengths=list(result.acceptance_lengths),
               stage_seconds=dict(result.stage_seconds), lookup=lookup)


def run_bench(decoder: Decoder, prompts: dict[str, list[tuple[str, list[int]]]], config: BenchConfig,
              progress: bool = True) -> list[Run]:
    """Time every variant of `config` on every prompt. `prompts`: dataset -> [(prompt id, token ids)].

    Each run's `matches_ar` compares its tokens with our ar's on the same prompt: every method of ours must
    match (it is lossless, greedy or seeded); transformers' baselines are compared only when greedy, since
    they sample with other noise."""
    variants = config.variants()
    if any(m != "ar" and m not in BASELINES for m, _, _ in variants) and decoder.drafter is None:
        raise TreeFlashError("methods other than ar need a drafter; pass --drafter PATH or 'untrained'")
    memory = PeakMemory(decoder.target.device)
    first = next((ids for items in prompts.values() for _, ids in items), None)
    if first is not None and config.warmup:
        bar = tqdm(total=config.warmup * len(variants), desc="warm-up", unit="run", disable=not progress)
        for _ in range(config.warmup):
            for method, budget, lookup in variants:
                _generate(decoder, method, budget, lookup, first, config, min(config.max_new_tokens, WARMUP_TOKENS),
                          "", "")
                bar.update(1)
        bar.close()

    runs: list[Run] = []
    total = sum(len(items) for items in prompts.values()) * len(variants)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress)
    for dataset, items in prompts.items():
        for prompt_id, ids in items:
            reference = None
            for method, budget, lookup in variants:
                bar.set_postfix_str(f"{dataset} {variant_label(method, budget or 0, lookup)}", refresh=False)
                memory.start()
                run = _generate(decoder, method, budget, lookup, ids, config, config.max_new_tokens, dataset,
                                prompt_id)
                run.peak_memory_bytes, run.peak_memory_delta_bytes = memory.stop()
                if method == "ar":
                    reference = run.token_ids
                if method not in BASELINES or config.temperature == 0:
                    run.matches_ar = run.token_ids == reference
                runs.append(run)
                bar.update(1)
    bar.close()
    return runs
