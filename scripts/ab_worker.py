"""One side of `scripts/ab_decode.py`: loads a decoder, then decodes each prompt it is sent on stdin.

Started by ab_decode.py with the treeflash to measure first on its path (a setting's `code=DIR`), so it uses
only what every version of the package has: `treeflash.load`, `DecodeConfig` and `Decoder.generate`.

    python scripts/ab_worker.py SETTING_JSON    # SETTING_JSON: {"target", "drafter", "drafter_dtype",
                                                #                "threads", "config": {DecodeConfig fields}}

Says `RESULT {"treeflash": WHERE_IT_WAS_IMPORTED_FROM}` once loaded, then reads one JSON object per line
({"prompt": TEXT}) and answers each with a line `RESULT {"token_ids", "seconds", "acceptance_lengths"}` on
stdout (other output of the library goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

import treeflash

RESULT = "RESULT "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setting", help="the setting as JSON (see above)")
    setting = json.loads(parser.parse_args().setting)
    answer = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the protocol owns stdout; library prints go to the log
        torch.set_num_threads(setting["threads"])
        decoder = treeflash.load(setting["target"], setting["drafter"], drafter_dtype=setting["drafter_dtype"])
        config = treeflash.DecodeConfig(**setting["config"])
        decoder.generate(decoder.target.encode_prompt("Hello"), treeflash.DecodeConfig(max_new_tokens=16))  # warm-up
        print(RESULT + json.dumps({"treeflash": os.path.dirname(treeflash.__file__)}), file=answer, flush=True)  # ready
        for line in sys.stdin:
            ids = decoder.target.encode_prompt(json.loads(line)["prompt"])
            result = decoder.generate(list(ids), config)
            print(RESULT + json.dumps({"token_ids": list(result.token_ids), "seconds": result.seconds,
                                       "acceptance_lengths": list(result.acceptance_lengths)}),
                  file=answer, flush=True)


if __name__ == "__main__":
    main()
