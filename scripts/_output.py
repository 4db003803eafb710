"""What the measurement scripts share: writing their Markdown where asked, and showing it."""

from __future__ import annotations

from pathlib import Path


def write_markdown(text: str, out: Path | str | None) -> None:
    """Write `text` to `out` (folders made as needed) unless it is None, and print it."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)
