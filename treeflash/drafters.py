"""The DFlash block drafter and the TreeFlash AR-approximation head.

Glossary:
  block      `[anchor, MASK x (b-1)]`: the anchor is the last committed token (the bonus token the target
             has not run on yet) at position p; output k (1..b-1) predicts the token at position p + k.
  marginal   the drafter's distribution at one block position, conditioned on the context only.
  context    fused target features of committed positions strictly before the anchor:
             `hidden_norm(fc(concat(target layer outputs)))`, one H-wide vector per position.
  conditional  the head's distribution at position k given a candidate token c at position k - 1.

Architecture (matches the public z-lab DFlash and ETH TreeFlash checkpoints): Qwen3-style decoder layers of
the target's width; in every layer the block's queries attend, without a causal mask, to keys/values of
[context features ; block hidden states] ("KV injection"); no embedding or LM head of its own: the target's
are used, frozen. The drafter caches only the context keys/values.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .cache import KVCache
from .errors import TreeFlashError
from .packing import FusedLinear, fused_map, linear_map
from .targets import Target, apply_rotary, upcast

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def default_target_layer_ids(num_target_layers: int, count: int = 5) -> tuple[int, ...]:
    """`count` target layers spread evenly from layer 1 to layer L-3 (DFlash's choice, with `count` equal
    to the drafter's depth; Python's round() rounds halves to even, as theirs does)."""
    if num_target_layers < 4:
        return tuple(range(num_target_layers))
    if count == 1:
        return (num_target_layers // 2,)
    span = num_target_layers - 4
    return tuple(int(round(1 + i * span / (count - 1))) for i in range(count))


def default_mask_token_id(target: Target) -> int:
    """A token id that has an embedding row but never appears in ordinary text.

    Prefers a spare embedding row past the tokenizer's vocabulary (Qwen3: 151669); otherwise the last
    special token that the chat template and bos/eos/pad do not use (SmolLM2: 16, `<empty_output>`).
    """
    rows = target.embed_tokens.weight.shape[0]
    tok = target.tokenizer
    if tok is None:
        return rows - 1
    if rows > len(tok):
        return len(tok)
    used = {getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    template = getattr(tok, "chat_template", None) or ""
    specials = sorted(
        (i for i, t in tok.added_tokens_decoder.items() if t.special and i not in used and t.content not in template),
        reverse=True,
    )
    if not specials:
        raise TreeFlashError("found no unused special token to serve as the mask token; pass mask_token_id")
    return specials[0]


@dataclasses.dataclass
class DrafterConfig:
    """Shape and wiring of a drafter. Field names follow the public DFlash/TreeFlash config.json."""

    hidden_size: int  # H, the target's hidden size
    intermediate_size: int  # MLP width of the drafter layers
    num_hidden_layers: int  # drafter depth (DFlash: 5 for 36-layer targets)
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary (its LM head's rows)
    num_target_layers: int  # L of the target the drafter was built for
    target_layer_ids: tuple[int, ...]  # target decoder layers whose outputs form the context features
    mask_token_id: int  # the MASK token filling the block after the anchor
    block_size: int = 16  # b: anchor + b-1 drafted positions
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = dataclasses.field(default_factory=lambda: {"rope_type": "default", "rope_theta": 1e6})
    max_position_embeddings: int = 32768
    ar_head: bool = True  # has a TreeFlash AR-approximation head (zero-initialised = plain DFlash)
    candidate_tokens: int = 16  # m: candidate parents per position for the head's second stage
    ar_intermediate_size: int | None = None  # I of the head's SwiGLU; defaults to intermediate_size
    target: str | None = None  # name of the target, for humans and error messages
    draft_vocab_size: int | None = None  # Vd: the drafter predicts only these target tokens (None = all V)

    def __post_init__(self):
        self.target_layer_ids = tuple(int(i) for i in self.target_layer_ids)
        if self.ar_intermediate_size is None:
            self.ar_intermediate_size = self.intermediate_size

    @classmethod
    def for_target(cls, target: Target, num_hidden_layers: int = 5, block_size: int = 16, **overrides):
        """A drafter shaped like `target`'s layers, reading as many evenly spread target layers as it has
        layers of its own (DFlash's default)."""
        c = target.config
        fields = dict(
            hidden_size=target.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=target.num_heads,
            num_key_value_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            vocab_size=target.vocab_size,
            num_target_layers=target.num_layers,
            target_layer_ids=default_target_layer_ids(target.num_layers, num_hidden_layers),
            mask_token_id=default_mask_token_id(target),
            block_size=block_size,
            rms_norm_eps=c.rms_norm_eps,
            rope_parameters=dict(c.rope_parameters),
            max_position_embeddings=target.max_length,
            target=target.name,
        )
        fields.update(overrides)
        return cls(**fields)

    def qwen3_config(self):
        from transformers import Qwen3Config

        return Qwen3Config(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=dict(self.rope_parameters),
            max_position_embeddings=self.max_position_embeddings,
            attention_bias=False,
            tie_word_embeddings=False,
        )

    def to_json_dict(self) -> dict:
        """A Qwen3-style config.json with the DFlash fields (and TreeFlash's when there is a head)."""
        d = self.qwen3_config().to_dict()
        for key in ("_name_or_path", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
                    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder"):
            d.pop(key, None)
        rope = dict(self.rope_parameters)
        d["rope_theta"] = rope.get("rope_theta")  # older readers (SGLang, vLLM) look here
        d["architectures"] = ["TreeFlashDraftModel" if self.ar_head else "DFlashDraftModel"]
        d["block_size"] = self.block_size
        d["num_target_layers"] = self.num_target_layers
        d["dflash_config"] = {"target_layer_ids": list(self.target_layer_ids), "mask_token_id": self.mask_token_id}
        if self.ar_head:
            d["treeflash_config"] = {
                "ar_approximation": "swiglu",
                "candidate_tokens": self.candidate_tokens,
                "ar_intermediate_size": self.ar_intermediate_size,
            }
        if self.target:
            d["target_model"] = self.target
        if self.draft_vocab_size:
            d["draft_vocab_size"] = self.draft_vocab_size
        return d

    @classmethod
    def from_json_dict(cls, d: dict) -> "DrafterConfig":
        try:
            dflash = d["dflash_config"]
            rope = d.get("rope_parameters") or {"rope_type": "default", "rope_theta": d.get("rope_theta", 1e6)}
            if d.get("rope_scaling"):
                rope = {**d["rope_scaling"], "rope_theta": d.get("rope_theta", 1e6)}
                rope.setdefault("rope_type", rope.pop("type", "default"))
            head = d.get("treeflash_config")
            if head is None and d.get("ar_approximation"):  # ETH also reads these top-level fields
                head = {"ar_approximation": d["ar_approximation"], "candidate_tokens": d.get("candidate_tokens", 16)}
            return cls(
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
                head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
                vocab_size=d["vocab_size"],
                num_target_layers=d["num_target_layers"],
                target_layer_ids=tuple(dflash["target_layer_ids"]),
                mask_token_id=dflash["mask_token_id"],
                block_size=d.get("block_size", 16),
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_parameters=rope,
                max_position_embeddings=d.get("max_position_embeddings", 32768),
                ar_head=head is not None,
                candidate_tokens=(head or {}).get("candidate_tokens", 16),
                ar_intermediate_size=(head or {}).get("ar_intermediate_size"),
                target=d.get("target_model"),
                draft_vocab_size=d.get("draft_vocab_size"),
            )
        except KeyError as e:
            raise TreeFlashError(
                f"drafter config.json lacks the field {e.args[0]!r}; it is not a DFlash/TreeFlash drafter config"
            ) from None


class ARHead(nn.Module):
    """TreeFlash's AR-approximation head: a correction of the drafter's hidden state at position k for a
    candidate token c at position k - 1. Zero-initialised output, so an untrained head is plain DFlash."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

        self.norm = Qwen3RMSNorm(hidden_size, eps=1e-6)  # fixed, as in the ETH checkpoints
        self.ug = nn.Linear(2 * hidden_size, 2 * intermediate_size, bias=True)
        self.d = nn.Linear(intermediate_size, hidden_size, bias=False)
        nn.init.zeros_(self.d.weight)

    def forward(self, parent_embeds: Tensor, hidden_normed: Tensor, maps: DrafterMaps | None = None) -> Tensor:
        """parent_embeds [R, H] (target embedding of c), hidden_normed [R, H] -> delta [R, H]. `maps`: the
        drafter's (packed) projections, else this module's own."""
        ug, d = (self.ug, self.d) if maps is None else (maps.ug, maps.d)
        x = torch.cat((self.norm(parent_embeds), hidden_normed), dim=-1)
        u, g = ug(x).chunk(2, dim=-1)
        return d(F.silu(g) * u)


@dataclasses.dataclass
class DrafterMaps:
    """The drafter's projections as one forward pass uses them: packed snapshots for inference, or the live
    modules' weights while training (see `treeflash.packing`)."""

    fc: FusedLinear  # target features [c, k*H] -> [c, H]
    q: list[FusedLinear]  # per layer: block [n, H] -> queries [n, heads*d]
    kv: list[FusedLinear]  # per layer: [context ; block] [c+n, H] -> keys, values [c+n, kv_heads*d] each
    o: list[FusedLinear]  # per layer: [n, heads*d] -> [n, H]
    gate_up: list[FusedLinear]  # per layer: [n, H] -> gate, up [n, I] each
    down: list[FusedLinear]  # per layer: [n, I] -> [n, H]
    ug: FusedLinear | None  # TreeFlash head: [R, 2H] -> u, g [R, I_ar] each
    d: FusedLinear | None  # TreeFlash head: [R, I_ar] -> delta [R, H]


@dataclasses.dataclass
class BlockDraft:
    hidden: Tensor  # [b-1, H] drafter hidden states (before the final norm) of block positions 1..b-1
    logits: Tensor  # [b-1, V] marginal logits (at least float32) of positions 1..b-1


class Drafter(nn.Module):
    """DFlash drafter (+ optional TreeFlash head). Embedding and LM head are borrowed from the target at
    call time and never trained or saved."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

        self.config = config
        qwen3 = config.qwen3_config()
        H = config.hidden_size
        self.layers = nn.ModuleList(Qwen3DecoderLayer(qwen3, i) for i in range(config.num_hidden_layers))
        self.fc = nn.Linear(len(config.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = Qwen3RMSNorm(H, eps=config.rms_norm_eps)
        self.norm = Qwen3RMSNorm(H, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(qwen3)
        self._inv_freq = self.rotary_emb.inv_freq.detach().float().clone()  # kept out of .to(dtype)
        self.ar_approximation = (
            ARHead(H, config.ar_intermediate_size) if config.ar_head else None
        )
        if config.draft_vocab_size:
            # Target token ids the drafter predicts (a reduced draft vocabulary). Its LM head is these rows
            # of the target's, so drafting costs Vd/V of a full head; verification is unchanged (lossless).
            self.register_buffer("draft_vocab", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        else:
            self.draft_vocab = None
        self._head_cache: tuple | None = None  # (key, target LM-head rows of the draft vocabulary, their packed map)
        self._packed: tuple | None = None  # (key of the weights, DrafterMaps packed for inference)
        # Training only (see training.feature_scale): per-input powers of two that `fc` is trained behind, so
        # that the target's massive activations don't dominate; folded into `fc.weight` whenever it is saved.
        self.register_buffer("feature_scale", None, persistent=False)
        self._init_weights(qwen3.initializer_range)

    def _init_weights(self, std: float):
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("ar_approximation.d"):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def new_cache(self, capacity: int) -> KVCache:
        c = self.config
        p = next(self.parameters())
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, p.dtype, p.device)

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [..., n, head_dim] for positions [..., n] in the drafter's dtype, always computed in float32:
        a bfloat16 drafter would otherwise round its inverse frequencies and misplace every position beyond a
        few hundred."""
        inv_freq = self._inv_freq.to(positions.device)
        angles = positions[..., None].float() * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        scaling, dtype = self.rotary_emb.attention_scaling, self.fc.weight.dtype
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)

    def maps(self) -> DrafterMaps:
        """The projections to run with: packed once (and again whenever a weight changes) when gradients are
        off, the modules' own weights otherwise."""
        pack = not torch.is_grad_enabled()
        if pack:
            key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
            if self._packed is not None and self._packed[0] == key:
                return self._packed[1]
        head = self.ar_approximation
        maps = DrafterMaps(
            fc=linear_map(self.fc, pack),
            q=[linear_map(layer.self_attn.q_proj, pack) for layer in self.layers],
            kv=[fused_map([layer.self_attn.k_proj, layer.self_attn.v_proj], pack) for layer in self.layers],
            o=[linear_map(layer.self_attn.o_proj, pack) for layer in self.layers],
            gate_up=[fused_map([layer.mlp.gate_proj, layer.mlp.up_proj], pack) for layer in self.layers],
            down=[linear_map(layer.mlp.down_proj, pack) for layer in self.layers],
            ug=None if head is None else linear_map(head.ug, pack),
            d=None if head is None else linear_map(head.d, pack),
        )
        if pack:
            self._packed = (key, maps)
        return maps

    def fuse(self, target_features: Tensor) -> Tensor:
        """Target layer outputs [n, k*H] -> context features [n, H]."""
        if self.feature_scale is not None:
            target_features = target_features * self.feature_scale.to(target_features.dtype)
        return self.hidden_norm(self.maps().fc(target_features))

    def forward_block(
        self,
        block_embeds: Tensor,
        block_positions: Tensor,
        context: Tensor,
        context_positions: Tensor,
        cache: KVCache | None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """The drafter layers over one block (or several, in training), optionally for a batch of sequences.

        block_embeds [(S,) n, H] with positions [(S,) n]; context [(S,) c, H] fused features with positions
        [(S,) c], appended to `cache` if one is given (unbatched only; their keys/values are then committed,
        the block's never are; `forward_cached` is the batched form). context_mask [(S,) n, (cached) + c + n]
        bool, None = every block row sees everything (inference). Returns the block's hidden states [(S,) n, H]
        before the final norm.
        """
        batched = block_embeds.dim() == 3
        if cache is not None:
            if batched:
                raise ValueError("a drafter cache holds one sequence; use forward_cached for a batch")
            if context_mask is not None:
                raise ValueError("a cached pass sees its whole context; context_mask is for training")
            return self.forward_cached(block_embeds[None], block_positions[None], [context], [context_positions],
                                       [cache])[0]
        if not batched:
            block_embeds, block_positions, context, context_positions = (
                t[None] for t in (block_embeds, block_positions, context, context_positions))
            context_mask = None if context_mask is None else context_mask[None]
        S, n, c = block_embeds.shape[0], block_embeds.shape[1], context.shape[1]
        cos, sin = self.rotary(torch.cat((context_positions, block_positions), dim=1))  # [S, c+n, d]
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        mask = None if context_mask is None else context_mask[:, None]  # [S, 1, n, c+n]
        maps = self.maps()
        h = block_embeds
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            kv_input = torch.cat((context, x), dim=1)  # [S, c + n, H]: context features are not re-normed
            k, v = maps.kv[index].split(kv_input)
            q = attn.q_norm(maps.q[index](x).view(S, n, -1, attn.head_dim)).transpose(1, 2)
            k = attn.k_norm(k.view(S, c + n, -1, attn.head_dim)).transpose(1, 2)
            v = v.view(S, c + n, -1, attn.head_dim).transpose(1, 2)
            q = apply_rotary(q, cos[:, :, c:], sin[:, :, c:])
            k = apply_rotary(k, cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
            h = self._mlp(index, maps, h + maps.o[index](out.transpose(1, 2).reshape(S, n, -1)))
        return h if batched else h[0]

    def forward_cached(self, block_embeds: Tensor, block_positions: Tensor, contexts: list[Tensor],
                       context_positions: list[Tensor], caches: list[KVCache]) -> Tensor:
        """Inference over S sequences at once, each with its own cache: block_embeds [S, n, H] at positions
        [S, n]; contexts[i] [c_i, H] fused features of sequence i's newly committed positions
        context_positions[i] [c_i], appended to caches[i] (committed; the blocks' keys/values are not).
        Every block row sees its sequence's whole cached context and its whole block. The projections run once
        over all rows; attention runs per sequence. Returns the blocks' hidden states [S, n, H] before the
        final norm."""
        S, n = block_embeds.shape[:2]
        sizes = [int(c.shape[0]) + n for c in contexts]  # rows of sequence i in the key/value input
        maps = self.maps()
        positions = torch.cat([t for pair in zip(context_positions, block_positions) for t in pair])  # [T]
        cos, sin = self.rotary(positions)  # [T, d]
        block_rows = torch.cat([torch.arange(size - n, size) for size in sizes]) + torch.tensor(
            [0] + sizes[:-1]).cumsum(0).repeat_interleave(n)  # where the block rows sit among the T rows
        block_rows = block_rows.to(block_embeds.device)
        q_cos, q_sin = cos[block_rows], sin[block_rows]
        h = block_embeds.reshape(S * n, -1)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)  # [S*n, H]
            blocks = x.view(S, n, -1)
            kv_input = torch.cat([t for i, c in enumerate(contexts) for t in (c, blocks[i])])  # [T, H]
            k, v = maps.kv[index].split(kv_input)
            q = attn.q_norm(maps.q[index](x).view(S * n, -1, attn.head_dim)).transpose(0, 1)  # [heads, S*n, d]
            k = attn.k_norm(k.view(k.shape[0], -1, attn.head_dim)).transpose(0, 1)  # [kv_heads, T, d]
            v = v.view(v.shape[0], -1, attn.head_dim).transpose(0, 1)
            q = apply_rotary(q, q_cos, q_sin)
            k = apply_rotary(k, cos, sin)
            outs, start = [], 0
            for i, (cache, size) in enumerate(zip(caches, sizes)):
                keys, values = cache.write(index, k[:, start:start + size], v[:, start:start + size])
                outs.append(F.scaled_dot_product_attention(q[None, :, i * n:(i + 1) * n], keys[None], values[None],
                                                           scale=attn.scaling, enable_gqa=True)[0])
                start += size
            out = outs[0] if S == 1 else torch.cat(outs, dim=1)  # [heads, S*n, d]
            h = self._mlp(index, maps, h + maps.o[index](out.transpose(0, 1).reshape(S * n, -1)))
        for cache, c in zip(caches, contexts):
            cache.advance(c.shape[0])
        return h.view(S, n, -1)

    def _mlp(self, index: int, maps: DrafterMaps, h: Tensor) -> Tensor:
        """Layer `index`'s MLP block with its residual, on h [..., H] (after the attention's residual)."""
        layer = self.layers[index]
        gate, up = maps.gate_up[index].split(layer.post_attention_layernorm(h))
        return h + maps.down[index](layer.mlp.act_fn(gate) * up)

    @torch.inference_mode()
    def draft(self, target: Target, anchor: int, new_features: Tensor, cache: KVCache) -> BlockDraft:
        """One drafting pass: add the target features of newly committed positions [c, k*H] to the
        context, then draft the block after `anchor`, which sits right after the context."""
        return self.draft_batch(target, [anchor], [new_features], [cache])[0]

    @torch.inference_mode()
    def draft_batch(self, target: Target, anchors: list[int], new_features: list[Tensor],
                    caches: list[KVCache]) -> list[BlockDraft]:
        """`draft` for several sequences in one drafter pass: anchors[i], new_features[i] [c_i, k*H] and
        caches[i] are sequence i's. The blocks all have the drafter's block size, so one LM-head call
        covers all of them."""
        dtype = self.fc.weight.dtype
        sizes = [int(f.shape[0]) for f in new_features]
        fused = self.fuse(torch.cat(new_features).to(dtype))  # [sum c_i, H]
        contexts = list(fused.split(sizes))
        device, b = fused.device, self.block_size
        starts = [cache.length for cache in caches]
        context_positions = [torch.arange(s, s + c, device=device) for s, c in zip(starts, sizes)]
        anchor_positions = torch.tensor([s + c for s, c in zip(starts, sizes)], device=device)  # [S]
        block_positions = anchor_positions[:, None] + torch.arange(b, device=device)  # [S, b]
        blocks = torch.full((len(anchors), b), self.config.mask_token_id, dtype=torch.long, device=device)
        blocks[:, 0] = torch.tensor(anchors, device=device)
        embeds = target.embed_tokens(blocks).to(dtype)  # [S, b, H]
        h = self.forward_cached(embeds, block_positions, contexts, context_positions, caches)[:, 1:]  # [S, b-1, H]
        logits = self.logits(target, h.reshape(-1, h.shape[-1])).view(len(anchors), b - 1, -1)
        return [BlockDraft(hidden=h[i], logits=logits[i]) for i in range(len(anchors))]

    def logits(self, target: Target, hidden: Tensor) -> Tensor:
        """Drafter hidden states [n, H] (pre-norm) -> logits [n, Vd] (at least float32) via the target's LM head
        (its draft-vocabulary rows; Vd = V without one), in the drafter's dtype. Column j is target token
        `token_ids(j)`."""
        x = self.norm(hidden)
        rows, packed = self._head(target, x.dtype)
        return upcast(F.linear(x, rows) if torch.is_grad_enabled() else packed(x))

    def _head(self, target: Target, dtype: torch.dtype) -> tuple[Tensor, FusedLinear]:
        """The target LM head's rows for the draft vocabulary (all rows without one) [Vd, H] in `dtype`, and
        the same packed for inference; gathered, cast and packed once per target and dtype (a bfloat16 drafter
        on a float32 target drafts at bf16 speed)."""
        weight = target.lm_head.weight
        key = (id(weight), weight.data_ptr(), weight.dtype, dtype, weight.device,
               None if self.draft_vocab is None else self.draft_vocab.data_ptr())
        if self._head_cache is None or self._head_cache[0] != key:
            assert target.lm_head.bias is None, "LM heads with a bias are not supported here"
            rows = weight.detach() if self.draft_vocab is None else weight.detach()[self.draft_vocab.to(weight.device)]
            rows = rows.to(dtype)
            # The whole head in the target's dtype is the target's own map (packed once, by the target).
            packed = None if rows.data_ptr() == weight.data_ptr() else FusedLinear([rows])
            self._head_cache = (key, rows, packed)
        _, rows, packed = self._head_cache
        return rows, target.lm_head_map if packed is None else packed

    def token_ids(self, indices: Tensor) -> Tensor:
        """Columns of the drafter's logits -> target token ids (identity without a draft vocabulary)."""
        return indices if self.draft_vocab is None else self.draft_vocab[indices]

    def draft_index(self, vocab_size: int) -> Tensor:
        """[V] int64: each target token's column in the drafter's logits, -1 if outside the draft vocabulary."""
        if self.draft_vocab is None:
            return torch.arange(vocab_size, device=self.fc.weight.device)
        index = torch.full((vocab_size,), -1, dtype=torch.long, device=self.draft_vocab.device)
        index[self.draft_vocab] = torch.arange(self.draft_vocab.numel(), device=self.draft_vocab.device)
        return index

    def conditional_logits(self, target: Target, hidden: Tensor, parents: Tensor) -> Tensor:
        """TreeFlash stage 2. hidden [R, H] (the drafter state at each row's position), parents [R] (the
        candidate token at the previous position) -> conditional logits [R, V]."""
        if self.ar_approximation is None:
            raise TreeFlashError("this drafter has no TreeFlash head; use --method ddtree or a TreeFlash drafter")
        embeds = target.embed_tokens(parents).to(hidden.dtype)
        delta = self.ar_approximation(embeds, self.norm(hidden), self.maps())
        return self.logits(target, hidden + delta)


# --------------------------------------------------------------------------------------------------
# Checkpoints: config.json + model.safetensors.
# Without a head we write the z-lab DFlash layout (`layers.*`, `fc`, `hidden_norm`, `norm`), loadable by
# SGLang and vLLM; with a head, the ETH TreeFlash layout (the same under `model.*`, plus
# `ar_approximation.*`). Both layouts load.


def checkpoint_state_dict(drafter: Drafter) -> dict[str, Tensor]:
    """The tensors a checkpoint holds: the feature scale folded into fc, in the layout of `save_drafter`."""
    sd = {k: v.detach().contiguous() for k, v in drafter.state_dict().items()}
    if drafter.feature_scale is not None:  # fold the training-time feature scale into fc (exact: powers of two)
        sd["fc.weight"] = sd["fc.weight"] * drafter.feature_scale.to(sd["fc.weight"].dtype)[None, :]
    if drafter.ar_approximation is None:
        return sd
    return {(k if k.startswith("ar_approximation.") else f"model.{k}"): v for k, v in sd.items()}


def save_drafter(drafter: Drafter, path: str | Path, dtype: torch.dtype | None = None, extra: dict | None = None):
    """Write `path`/config.json and `path`/model.safetensors (optionally cast to `dtype`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = drafter.config.to_json_dict()
    sd = checkpoint_state_dict(drafter)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    config["dtype"] = str(next(v.dtype for v in sd.values() if v.is_floating_point())).removeprefix("torch.")
    if extra:
        config.update(extra)
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_drafter(path: str | Path, target: Target | None = None, dtype: torch.dtype | None = None) -> Drafter:
    """Load a drafter in our, the z-lab DFlash or the ETH TreeFlash layout, checked against `target`.

    It runs in `dtype`, else in the target's dtype, else in the checkpoint's."""
    path = Path(path)
    if not path.is_dir():
        raise TreeFlashError(f"drafter directory {path} does not exist; pass a folder with config.json and *.safetensors")
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        raise TreeFlashError(f"{path} has no config.json; it is not a drafter checkpoint")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise TreeFlashError(f"{config_file} is not valid JSON ({e}); restore the file or re-save the drafter") from None
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        raise TreeFlashError(f"{path} has no .safetensors weights; the checkpoint is incomplete")
    sd: dict[str, Tensor] = {}
    for f in weight_files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise TreeFlashError(f"{f} is corrupted or truncated ({e}); download or save the drafter again") from None
    has_head = any(k.startswith("ar_approximation.") for k in sd)
    if has_head and "treeflash_config" not in raw:
        raw["treeflash_config"] = {}
    config = DrafterConfig.from_json_dict(raw)
    if has_head and config.ar_intermediate_size == config.intermediate_size and "ar_approximation.d.weight" in sd:
        config.ar_intermediate_size = sd["ar_approximation.d.weight"].shape[1]
    config.ar_head = has_head or config.ar_head
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    # vLLM's reduced draft vocabulary (`treeflash export --format vllm`): an own LM head of the target's rows
    # for draft ids, and d2t with target id = draft id + d2t[draft id]. We borrow the target's head instead.
    own_head = sd.pop("lm_head.weight", None)
    if "d2t" in sd:
        d2t = sd.pop("d2t").long()
        sd["draft_vocab"] = torch.arange(d2t.numel()) + d2t
        config.draft_vocab_size = d2t.numel()
    stored_dtype = next(v.dtype for v in sd.values() if v.is_floating_point())
    drafter = Drafter(config).to(stored_dtype)
    if not has_head and config.ar_head:
        sd.update({f"ar_approximation.{k}": v for k, v in drafter.ar_approximation.state_dict().items()})
    try:
        drafter.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise TreeFlashError(
            f"the weights in {path} do not match its config.json ({' '.join(first[:2])[:300]}); "
            "the checkpoint is inconsistent or for another architecture"
        ) from None
    if target is not None:
        check_compatible(drafter, target)
        if own_head is not None:
            rows = target.lm_head.weight.detach().cpu()
            rows = rows if drafter.draft_vocab is None else rows[drafter.draft_vocab.cpu()]
            if rows.shape != own_head.shape or not torch.allclose(rows.to(own_head.dtype).float(), own_head.float(),
                                                                  atol=1e-2, rtol=1e-2):
                raise TreeFlashError(f"the lm_head in {path} is not the target's LM head (for its draft vocabulary); "
                                     "this drafter was exported for another target")
        drafter.to(device=target.device, dtype=dtype or target.dtype)
    elif dtype is not None:
        drafter.to(dtype)
    drafter.eval()
    drafter.requires_grad_(False)
    return drafter


def check_compatible(drafter: Drafter, target: Target) -> None:
    """Raise TreeFlashError if `drafter` was not built for a target shaped like `target`."""
    c = drafter.config
    who = f"drafter for {c.target!r}" if c.target else "drafter"
    if c.hidden_size != target.hidden_size:
        raise TreeFlashError(
            f"{who} has hidden size {c.hidden_size} but target {target.name!r} has {target.hidden_size}; "
            "use a drafter trained for this target"
        )
    if c.vocab_size != target.vocab_size:
        raise TreeFlashError(
            f"{who} has vocabulary {c.vocab_size} but target {target.name!r} has {target.vocab_size}; "
            "use a drafter trained for this target"
        )
    if c.num_target_layers != target.num_layers or max(c.target_layer_ids) >= target.num_layers:
        raise TreeFlashError(
            f"{who} reads target layers {list(c.target_layer_ids)} of a {c.num_target_layers}-layer model but "
            f"target {target.name!r} has {target.num_layers} layers; use a drafter trained for this target"
        )
    if drafter.draft_vocab is not None and int(drafter.draft_vocab.max()) >= target.vocab_size:
        raise TreeFlashError(f"{who} has draft-vocabulary ids beyond target {target.name!r}'s vocabulary; "
                             "use a drafter trained for this target")
    if not 0 <= c.mask_token_id < target.embed_tokens.weight.shape[0]:
        raise TreeFlashError(
            f"{who} uses mask token {c.mask_token_id}, outside target {target.name!r}'s embedding; "
            "use a drafter trained for this target"
        )


def new_drafter(target: Target, num_hidden_layers: int = 5, block_size: int = 16, seed: int = 0,
                draft_vocab: Tensor | None = None, **overrides) -> Drafter:
    """An untrained drafter shaped for `target` (its head, if any, is zero: it drafts like DFlash)."""
    if block_size < 2:
        raise TreeFlashError(f"block size must be at least 2 (an anchor and one drafted position); got {block_size}")
    if num_hidden_layers < 1:
        raise TreeFlashError(f"a drafter needs at least one layer; got {num_hidden_layers}")
    if draft_vocab is not None:
        draft_vocab = torch.as_tensor(draft_vocab, dtype=torch.long).unique()
        if draft_vocab.numel() < 2 or int(draft_vocab.min()) < 0 or int(draft_vocab.max()) >= target.vocab_size:
            raise TreeFlashError("a draft vocabulary needs at least 2 distinct token ids of the target's vocabulary")
        overrides["draft_vocab_size"] = draft_vocab.numel()
    config = DrafterConfig.for_target(target, num_hidden_layers=num_hidden_layers, block_size=block_size, **overrides)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # nn.Linear's default init uses the global RNG; keep creation reproducible
    try:
        drafter = Drafter(config)
    finally:
        torch.random.set_rng_state(generator_state)
    if draft_vocab is not None:
        drafter.draft_vocab.copy_(draft_vocab)
    return drafter.to(device=target.device, dtype=target.dtype).eval().requires_grad_(False)
