"""How unbalanced the target's feature layers are: per layer, RMS, the 4 largest dimensions and their share of
the energy, and the mean cosine between positions (the numbers behind training.feature_scale).

    python scripts/feature_stats.py        # the default target, one regenerated training sequence
"""
import torch
from treeflash.targets import load_target
from treeflash.data import load_sequences
from treeflash.drafters import new_drafter
from treeflash.training import target_pass
torch.set_num_threads(1)
t = load_target(None)
d = new_drafter(t)
s = load_sequences("training/data/smollm2-sharegpt")[103]  # record 103: any response-length sequence
tokens = torch.tensor(s.tokens)
f, _ = target_pass(t, d, tokens, False)
f = f.view(len(tokens), 5, 576)
for j in range(5):
    x = f[1:, j]   # skip first token
    rms = x.pow(2).mean(-1).sqrt()
    top = x.abs().mean(0).topk(4)
    share = (x[:, top.indices].pow(2).sum(-1) / x.pow(2).sum(-1)).mean()
    # cosine similarity between different tokens
    xn = torch.nn.functional.normalize(x, dim=-1)
    cos = (xn @ xn.T).mean()
    print(j, "rms", round(rms.mean().item(),1), "top dims", top.indices.tolist(), [round(v,1) for v in top.values.tolist()], "share of top4", round(share.item(),3), "mean cos", round(cos.item(),3))
print("first token rms", f[0].pow(2).mean(-1).sqrt().tolist())
