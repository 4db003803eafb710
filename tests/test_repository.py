"""Checks on the repository itself: it stays small enough to clone quickly and to carry to a GPU machine."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The device tool carries 64 MiB of working tree (with shared/ and carried files); every clone pays for it too.
TRACKED_LIMIT = 40 * 2**20


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (install git, or run from a clone)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_the_tracked_tree_stays_under_40_mib():
    sizes = {path: path.stat().st_size for path in _tracked_files() if path.is_file()}
    total = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
    assert total <= TRACKED_LIMIT, (
        f"the tracked tree is {total / 2**20:.1f} MiB, over {TRACKED_LIMIT / 2**20:.0f} MiB; largest: "
        + ", ".join(f"{p.relative_to(ROOT)} ({s / 2**20:.1f} MiB)" for p, s in largest))
