"""TreeFlash: lossless speculative decoding with one-shot block drafters and draft trees.

Quick use:
    import treeflash
    decoder = treeflash.load()
    print(decoder.generate_text("Write a haiku about the sea.").text)

Layout. The inference core is this package's flat modules, one per stage: targets (the model verified),
drafters (block drafters and their checkpoints), trees (draft trees: build, compile), verification (accept,
follow), decoding (the decode loop), reference (the same loop, one sequence, on one screen), cache, packing
(packed weights), ngrams (n-gram lookup), plus api (load, generate), tuning, export and machine. The
applications sit on top as sub-packages: train/ (data, features, the training loop), serve/ (the HTTP server),
bench/ (benchmarks and analyses) and cli/ (the `treeflash` command). Nothing in the core imports them.
"""

from .api import TextDecoder, generate, load
from .decoding import METHODS, DecodeConfig, DecodeResult, Decoder
from .drafters import Drafter, DrafterConfig, load_drafter, new_drafter, save_drafter
from .errors import TreeFlashError
from .targets import Target, load_target

__version__ = "0.1.0"

__all__ = [
    "METHODS", "DecodeConfig", "DecodeResult", "Decoder", "Drafter", "DrafterConfig", "Target", "TextDecoder",
    "TreeFlashError", "generate", "load", "load_drafter", "load_target", "new_drafter", "save_drafter",
]
