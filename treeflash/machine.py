"""What machine this is: the processor (read once from /proc/cpuinfo), its features, and the software versions
that reports and tunings record as where a number was measured."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


@functools.cache
def cpuinfo() -> dict[str, str]:
    """/proc/cpuinfo's fields (lower-case names, each name's first value, so the first processor's); empty
    where there is none (macOS, Windows)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep:
                    info.setdefault(name.strip().lower(), value.strip())
    except OSError:
        pass
    return info


def cpu_vendor() -> str:
    """"GenuineIntel", "AuthenticAMD", ... (empty where unknown)."""
    return cpuinfo().get("vendor_id") or platform.processor()


def cpu_model() -> str:
    """The processor's name, for reports of where something was measured (e.g. "AMD EPYC")."""
    info = cpuinfo()
    for name in ("model name", "hardware", "cpu model"):
        if info.get(name):
            return info[name]
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_has_amx() -> bool:
    """Whether the processor has AMX bfloat16 tiles (Intel Sapphire Rapids and later)."""
    return "amx_bf16" in cpuinfo().get("flags", "").split()


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on: device, processor, threads, library versions, and the git commit of
    this checkout when there is one."""
    info = {
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        root = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def device_tag(info: dict) -> str:
    """A folder name for results from the machine `machine_info` describes: gpu-<name> or
    cpu-<model>-<threads>t."""
    name = info.get("gpu") if info["device"] == "cuda" else info["cpu"]
    slug = re.sub(r"\((r|tm)\)|\bnvidia\b|\bcpu\b|\bprocessor\b|@.*", " ", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-") or "unknown"
    return f"gpu-{slug}" if info["device"] == "cuda" else f"cpu-{slug}-{info['torch_threads']}t"
