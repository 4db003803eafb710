"""`treeflash export`: a drafter's DFlash backbone in the layout a serving engine loads.

    treeflash export DRAFTER OUT --format vllm|sglang|zlab [--target T] [--full-vocabulary]

What each engine reads (from their sources: vLLM `model_executor/models/qwen3_dflash.py` and its DFlash
proposer, SGLang `srt/models/dflash.py` and `speculative/dflash_utils.py`, z-lab `dflash/model.py`):

* config.json: a Qwen3 config (`model_type: qwen3`, `architectures: ["DFlashDraftModel"]`) with `block_size`,
  `num_target_layers` and `dflash_config: {target_layer_ids, mask_token_id}`.
* weights without a prefix: `layers.*` (with q_norm / k_norm), `fc.weight` [H, k*H], `hidden_norm.weight`,
  `norm.weight`. No embedding and no LM head: all three borrow the target's.
* `target_layer_ids` are 0-based target decoder layers whose *outputs* the drafter reads, as here. The
  engines capture hidden states *before* a layer, so they add 1 internally (vLLM: "Add 1 to convert DFlash's
  aux layer id semantics"; SGLang: "capture before layer k + 1"); the file carries the ids unchanged for both.
* A reduced draft vocabulary: only vLLM drafts over one, EAGLE-3 style, from the drafter's own `lm_head`
  [Vd, H] with `d2t` (target id = draft id + d2t[draft id]) and `draft_vocab_size`; the export writes those
  (the target's LM-head rows, hence `--target`). SGLang and the z-lab code draft over the target's whole
  vocabulary, so such a drafter is refused for them unless `--full-vocabulary` drops the reduction (it then
  scores every target token: its proposals change, the outputs of a lossless engine do not).

The TreeFlash head is not exported: no engine but `treeflash serve` runs it (the export says so). Everything
we export loads back here (`load_drafter`) and drafts exactly what the source drafter drafts, the
full-vocabulary case aside.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .drafters import CONFIG_FILE, WEIGHTS_FILE, Drafter, checkpoint_state_dict
from .errors import TreeFlashError

FORMATS = ("vllm", "sglang", "zlab")
ENGINES = {"vllm": "vLLM", "sglang": "SGLang", "zlab": "the z-lab DFlash code"}


@dataclasses.dataclass
class ExportReport:
    """What an export wrote and what it left out, for the user."""

    path: Path
    format: str
    dropped_head: bool  # the drafter had a TreeFlash head, which was not exported
    draft_vocab_size: int | None  # Vd written as a reduced draft vocabulary (vLLM), or None
    dropped_draft_vocab: bool  # --full-vocabulary dropped a reduced draft vocabulary

    def lines(self) -> list[str]:
        out = [f"exported the DFlash backbone for {ENGINES[self.format]} to {self.path}"]
        if self.dropped_head:
            out.append("left out its TreeFlash head, which only `treeflash serve` runs (the engine drafts DFlash chains)")
        if self.draft_vocab_size:
            out.append(f"wrote its {self.draft_vocab_size}-token draft vocabulary as lm_head.weight + d2t")
        if self.dropped_draft_vocab:
            out.append("dropped its reduced draft vocabulary (--full-vocabulary): it now drafts over every target token")
        return out


def export_drafter(drafter: Drafter, out: str | Path, format: str, target=None, full_vocabulary: bool = False,
                   dtype: torch.dtype | None = None) -> ExportReport:
    """Write `drafter`'s DFlash backbone to `out` in `format` (see the module docstring)."""
    if format not in FORMATS:
        raise TreeFlashError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    reduced = drafter.draft_vocab is not None and not full_vocabulary
    if reduced and format != "vllm":
        raise TreeFlashError(
            f"{ENGINES[format]} drafts over the target's whole vocabulary, but this drafter predicts a reduced "
            f"draft vocabulary of {drafter.draft_vocab.numel()} tokens; export --format vllm, or pass "
            "--full-vocabulary to drop the reduction")
    if reduced and target is None:
        raise TreeFlashError("a reduced draft vocabulary is exported with the target's LM-head rows, and this "
                             f"drafter's target ({drafter.config.target or 'not recorded'}) is not here; pass --target")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TreeFlashError(f"{out} is not empty; export into a new directory")

    config = dataclasses.replace(drafter.config, ar_head=False, draft_vocab_size=drafter.config.draft_vocab_size
                                 if reduced else None)
    weights = {k.removeprefix("model."): v for k, v in checkpoint_state_dict(drafter).items()}
    weights = {k: v for k, v in weights.items() if not k.startswith("ar_approximation.") and k != "draft_vocab"}
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    floating = next(v.dtype for v in weights.values() if v.is_floating_point())
    if reduced:
        ids = drafter.draft_vocab.detach().cpu()
        head = target.lm_head.weight.detach().cpu()[ids]
        weights["lm_head.weight"] = head.to(floating).contiguous()
        weights["d2t"] = (ids - torch.arange(ids.numel())).contiguous()  # target id = draft id + d2t[draft id]
    raw = config.to_json_dict()
    raw["dtype"] = str(floating).removeprefix("torch.")
    raw["target_hidden_size"] = config.hidden_size  # vLLM reads it (falls back to hidden_size)
    raw["exported_by"] = {"tool": "treeflash export", "format": format}

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(weights, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    return ExportReport(out, format, drafter.ar_approximation is not None, config.draft_vocab_size if reduced else None,
                        drafter.draft_vocab is not None and full_vocabulary)
