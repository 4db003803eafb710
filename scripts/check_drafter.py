"""Check a drafter end to end on the default target: every method must equal `ar` token for token, and
report each method's tau and speed relative to `ar` on MT-Bench and HumanEval prompts (greedy, 1 thread).

    python scripts/check_drafter.py DRAFTER_DIR [PROMPTS_PER_DATASET=3] [MAX_NEW_TOKENS=128]
"""
import sys, torch
torch.set_num_threads(1)
from treeflash.targets import load_target
from treeflash.drafters import load_drafter
from treeflash.decoding import Decoder, DecodeConfig
from treeflash.data import load_prompts
tg = load_target()
dr = load_drafter(sys.argv[1], tg)
dec = Decoder(tg, dr)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 3
new = int(sys.argv[3]) if len(sys.argv) > 3 else 128
prompts = load_prompts("mtbench")[:n] + load_prompts("humaneval")[:n]
tot = {}
for p in prompts:
    ids = tg.encode_prompt(p.text)
    ref = dec.generate(ids, DecodeConfig(method="ar", max_new_tokens=new))
    row = [p.id, len(ref.token_ids)]
    for m, b in (("dflash", None), ("ddtree", 64), ("treeflash", 64)):
        r = dec.generate(ids, DecodeConfig(method=m, budget=b, max_new_tokens=new))
        same = r.token_ids == ref.token_ids
        tot.setdefault(m, []).append((r.tau, same, r.tokens_per_second / ref.tokens_per_second))
        row.append(f"{m}: tau {r.tau:.2f} same={same}")
    print(*row, flush=True)
for m, v in tot.items():
    print(m, "mean tau", round(sum(x[0] for x in v)/len(v), 3), "all equal", all(x[1] for x in v), "mean speed vs ar", round(sum(x[2] for x in v)/len(v), 2))
