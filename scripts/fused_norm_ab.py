"""The fused RMSNorm (`treeflash.targets.norm_map`) against the transformers module, on this machine.

Prints whether they agree bit for bit in float32, the time per call of each on a [1, H] row, and a one-token
pass of the default target with each, alternating (median and best of ROUNDS rounds of 20 passes).

    python scripts/fused_norm_ab.py [THREADS] [ROUNDS]   # defaults: 1 thread, 30 rounds
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from treeflash.targets import load_target, norm_map


def per_call_us(fn, x: torch.Tensor, calls: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - start) / calls * 1e6


def main(threads: int = 1, rounds: int = 30) -> None:
    torch.set_num_threads(threads)
    target = load_target()
    target.pack()
    module = target.layers[0].input_layernorm
    fused = norm_map(module)
    with torch.inference_mode():
        x = 3 * torch.randn(300, target.hidden_size, generator=torch.Generator().manual_seed(0))
        print(f"bit-identical in float32: {torch.equal(fused(x), module(x))}")
        row = x[:1]
        print(f"per call, [1, {target.hidden_size}]: module {per_call_us(module, row):.1f} us, "
              f"fused {per_call_us(fused, row):.1f} us")

    cache = target.new_cache(1024)
    prompt = torch.tensor(target.encode_prompt("Write a haiku about the sea. " * 20))
    target.forward(prompt, torch.arange(len(prompt)), cache)
    cache.advance(len(prompt))
    token, position = torch.tensor([42]), torch.tensor([cache.length])
    fused_maps = [(m.input_norm, m.post_norm) for m in target.maps]
    fused_final = target._final_norm

    def use(fused_norms: bool) -> None:
        for maps, layer, (a, b) in zip(target.maps, target.layers, fused_maps):
            maps.input_norm, maps.post_norm = (a, b) if fused_norms else (layer.input_layernorm,
                                                                          layer.post_attention_layernorm)
        target._final_norm = fused_final if fused_norms else target.final_norm

    def pass_ms(passes: int = 20) -> float:
        start = time.perf_counter()
        for _ in range(passes):
            target.forward(token, position, cache)  # never committed: the same pass each time
        return (time.perf_counter() - start) / passes * 1000

    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for fused_norms in (True, False):
            use(fused_norms)
            times[fused_norms].append(pass_ms())
    for fused_norms, name in ((False, "module"), (True, "fused")):
        print(f"one-token pass, {name} norms: median {statistics.median(times[fused_norms]):.1f} ms, "
              f"best {min(times[fused_norms]):.1f} ms ({threads} thread(s), {rounds} alternating rounds)")


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:3]])
