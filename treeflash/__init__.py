"""TreeFlash: lossless speculative decoding with one-shot block drafters and draft trees.

Quick use:
    import treeflash
    decoder = treeflash.load()
    print(decoder.generate_text("Write a haiku about the sea.").text)
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
