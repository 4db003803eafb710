"""Smoke tests of every tool in scripts/: each runs as a user would run it (a subprocess of this Python), on
the tiny on-disk chat model where it needs a model, and must finish and write what it promises."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import model_dir  # noqa: F401  (the tiny Llama saved to disk with a word-level tokenizer)

from helpers import requires

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# Each script and where its smoke test is: here, except ab_worker.py (run by ab_decode.py's test) and
# device_check.py (tests/test_device_check.py runs its CPU smoke mode and checks what it prints).
TESTED = {"ab_decode.py", "ab_worker.py", "compare_bench.py", "device_check.py", "install.sh", "load_test.py",
          "plot_training.py", "profile_rounds.py"}


def run(script: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models; spinning threads only slow a busy machine
    result = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "tiny.jsonl"
    path.write_text(json.dumps({"id": "one", "prompt": "w3 w9 w27"}) + "\n"
                    + json.dumps({"id": "two", "prompt": "w5 w6"}) + "\n")
    return path


def test_every_script_has_a_smoke_test():
    assert {p.name for p in SCRIPTS.iterdir() if p.is_file()} == TESTED


def test_install_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPTS / "install.sh")], check=True)


def test_ab_decode_on_a_tiny_model(model_dir, prompts_file, tmp_path):  # noqa: F811
    """B runs ddtree; A runs ar from a checkout named by `code=` (here this one), through ab_worker.py."""
    out = tmp_path / "ab" / "ab.md"
    run("ab_decode.py", out, "--target", model_dir, "--a", f"method=ar,code={SCRIPTS.parent}",
        "--b", "method=ddtree,budget=4,drafter=untrained", "--datasets", prompts_file, "--prompts", 2,
        "--max-new-tokens", 6, "--repeats", 2, "--threads", 1)
    text = out.read_text()
    assert [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ")] == [
        "| dataset", f"| {prompts_file}", "| all"]
    assert f"Code: A {SCRIPTS.parent / 'treeflash'}," in text and "Both produced the same tokens on every prompt." in text


def test_profile_rounds_on_a_tiny_model(model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "stages.md"
    run("profile_rounds.py", out, "--target", model_dir, "--threads", 1, "--budget", 4, "--context", 32,
        "--new-tokens", 4)
    table = [line for line in out.read_text().splitlines() if line.startswith("| ") and "method" not in line]
    assert [line.split(" | ")[2] for line in table] == ["ar", "dflash", "ddtree", "treeflash"] * 2


def _summary(path: Path, verify_ms: float, tau: float) -> Path:
    """A `treeflash bench` summary.csv with one pooled row per variant (only the columns the script reads)."""
    path.mkdir(parents=True)
    stages = ("prefill", "draft", "head", "tree", "verify", "commit")
    columns = ["dataset", "method", "budget", "lookup", "tau", "tokens_per_second", "speedup_vs_ar",
               "speedup_vs_hf_generate", "agreement_with_ar", *(f"{s}_ms_per_round" for s in stages)]
    with (path / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerow(["all", "ar", 0, 0, 1.0, 20.0, 1.0, "", 1.0, 100.0, 0, 0, 0.1, verify_ms, 0.01])
        writer.writerow(["all", "treeflash", 2, 8, tau, 30.0, 1.5, "", 1.0, 100.0, 5.0, 4.0, 0.2, verify_ms, 0.01])
        writer.writerow(["mtbench", "ar", 0, 0, 1.0, 20.0, 1.0, "", 1.0, 100.0, 0, 0, 0.1, verify_ms, 0.01])
    return path


def test_compare_bench(tmp_path):
    before, after = _summary(tmp_path / "before", 40.0, 2.5), _summary(tmp_path / "after", 35.0, 2.6)
    out = tmp_path / "compare.md"
    run("compare_bench.py", before, after, out, "--title", "A title")
    text = out.read_text()
    assert text.startswith("A title") and "`treeflash@2+lookup8`" in text and "2.50 → **2.60**" in text
    assert sum(line.startswith("| `") for line in text.splitlines()) == 2  # the pooled rows only


def test_plot_training(tmp_path):
    pytest.importorskip("matplotlib", reason='needs matplotlib: pip install -e ".[bench]"')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    evaluation = {"marginal_chain_tau": 1.5, "conditional_chain_tau": 1.7, "marginal_top1": [0.5, 0.3, 0.2],
                  "conditional_top1": [0.5, 0.4, 0.3]}
    records = [{"step": s, "loss": 3.0 / s, "seconds": 6.0 * s} for s in range(1, 31)]
    records[9].update(evaluation)
    records[29].update(evaluation, marginal_chain_tau=1.8, conditional_chain_tau=2.0)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(evaluation))
    out = tmp_path / "curves" / "run.png"
    run("plot_training.py", out, run_dir, "--baseline", f"start={baseline}")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@requires("starlette", 'pip install -e ".[serve]"')
@requires("uvicorn", 'pip install -e ".[serve]"')
@requires("openai", 'pip install -e ".[regenerate]"')
def test_load_test_on_a_tiny_model(model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "load"
    run("load_test.py", "--out", out, "--target", model_dir, "--drafter", "untrained", "--max-batch", 1,
        "--concurrency", 1, "--requests", 2, "--max-tokens", 3, "--time-limit", 90)
    report = json.loads(out.with_suffix(".json").read_text())
    level = report["modes"][0]["levels"][0]
    assert level["requests"] == 2 and level["completion_tokens"] == 6 and not level["errors"]
    assert "| one at a time (max_batch 1) | 1 | 2 |" in out.with_suffix(".md").read_text()
