"""Data-parallel training under torchrun (gloo on the CPU): the same steps as one process, exact resume, and
a clear error instead of a hang when a rank dies. Every run is a real `treeflash train` subprocess."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import needs_eval_sets
from test_cli import model_dir  # noqa: F401  (the tiny Llama saved to disk with a word-level tokenizer)

STEPS = 4  # 8 training sequences, a global batch of 4, 2 epochs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("data")
    records = [{"id": f"r{i}", "prompt_ids": torch.randint(5, 97, (4,), generator=g).tolist(),
                "response_ids": torch.randint(5, 97, (14,), generator=g).tolist()} for i in range(10)]
    (path / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(model_dir, data, out, *extra):  # noqa: F811
    return ["-m", "treeflash.cli", "train", "drafter", "--data", str(data), "--out", str(out), "--target",
            str(model_dir), "--block-size", "4", "--target-layers", "2", "--anchors", "3", "--batch-size", "4",
            "--epochs", "2", "--val-sequences", "2", "--eval-every", "3", "--save-every", "1", *extra]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "TREEFLASH_DIST_TIMEOUT": "60", **extra}


def _run(argv, **kwargs):
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=240, env=_env(), **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _torchrun(argv, nproc=2):
    return _run(["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                 "--master_port", str(_free_port()), *argv])


def _weights(out):
    return load_file(str(out / "drafter" / "model.safetensors"))


def _close(a, b, tolerance):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tolerance, rtol=tolerance, msg=name)


@pytest.fixture(scope="module")
def two_ranks(model_dir, data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ranks") / "run"
    _torchrun(_train_args(model_dir, data, out))
    return out


def test_distributed_two_gloo_ranks_take_the_steps_of_one_process(model_dir, data, two_ranks, tmp_path):  # noqa: F811
    one = tmp_path / "one"
    _run(_train_args(model_dir, data, one))  # the same command without torchrun
    _close(_weights(two_ranks), _weights(one), 1e-5)
    log_two = [json.loads(line) for line in (two_ranks / "log.jsonl").read_text().splitlines()]
    log_one = [json.loads(line) for line in (one / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_two] == list(range(1, STEPS + 1))  # rank 0 alone writes the log
    assert [r["sequences"] for r in log_two] == [r["sequences"] for r in log_one] == [4] * STEPS
    assert [r["rows"] for r in log_two] == [r["rows"] for r in log_one]
    for a, b in zip(log_two, log_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert "anchor_sensitivity" in log_two[2] and "anchor_sensitivity" in log_two[-1]
    # A drafter that is not trained at all would differ: the comparison above can fail.
    untouched = tmp_path / "zero"
    _run(_train_args(model_dir, data, untouched, "--max-steps", "1"))
    with pytest.raises(AssertionError):
        _close(_weights(untouched), _weights(one), 1e-5)


def test_distributed_run_resumes_under_torchrun(model_dir, data, two_ranks, tmp_path):  # noqa: F811
    out = tmp_path / "resumed"
    _torchrun(_train_args(model_dir, data, out, "--max-steps", "2"))
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 2
    done = _torchrun(_train_args(model_dir, data, out))
    assert "resuming" in done.stderr and "at step 2" in done.stderr
    _close(_weights(out), _weights(two_ranks), 1e-6)


def test_distributed_a_global_batch_smaller_than_the_ranks_is_refused(model_dir, data, tmp_path):  # noqa: F811
    argv = _train_args(model_dir, data, tmp_path / "run")
    argv[argv.index("--batch-size") + 1] = "1"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_free_port()), *argv],
                          capture_output=True, text=True, timeout=240, env=_env())
    assert done.returncode != 0
    assert "a global batch of 1 sequences cannot be shared by 2 ranks" in done.stderr


def test_distributed_a_dead_rank_gives_a_clear_error_not_a_hang(model_dir, data, tmp_path):  # noqa: F811
    """Two ranks started as torchrun would start them; rank 1 is killed mid-run. Rank 0 must stop soon, with
    an error that says what happened (not wait for the collective timeout, nor forever)."""
    out = tmp_path / "run"
    argv = _train_args(model_dir, data, out)
    argv[argv.index("--epochs") + 1] = "500"  # long enough to be killed in the middle
    port = str(_free_port())
    ranks = [subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, TREEFLASH_DIST_TIMEOUT="900"))
             for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not ((out / "log.jsonl").exists() and len((out / "log.jsonl").read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and ranks[0].poll() is None, "training did not start"
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGKILL)
        # Well under the collective timeout (900 s here), so a run that only the timeout would end fails the
        # test, with room for a loaded machine (it stops within seconds when the cores are free).
        _, err = ranks[0].communicate(timeout=300)
        assert ranks[0].returncode != 0
        assert "lost contact with the other ranks" in err and "another rank failed or stopped" in err, err[-2000:]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()


def test_the_cli_leaves_at_once_after_a_lost_peer_whatever_teardown_would_wait_on():
    """After a lost peer, freeing DDP and the process group can wait on the dead rank (CI once saw a rank alive
    300 s after printing the error). Here a thread that never ends stands for that teardown: the process must
    still exit, with the error and status 2."""
    code = """
import argparse, sys, threading
from treeflash import cli
from treeflash.train import distributed
threading.Thread(target=threading.Event().wait).start()  # a teardown that never ends
def lose(args):
    raise distributed.lost_peer(distributed.Ranks(1, 2), 3, RuntimeError("Connection reset by peer"))
parser = argparse.ArgumentParser()
parser.set_defaults(func=lose)
cli.build_parser = lambda: parser
sys.exit(cli.main([]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "rank 1 of 2 lost contact with the other ranks at step 3" in done.stderr, done.stderr[-2000:]


def test_a_failed_collective_anywhere_in_a_step_is_a_lost_peer_only_for_distributed_ranks():
    """The dead-rank error depends on where the run is when the peer dies (forward, all-reduce, backward, the
    clock's broadcast): every such place goes through `peers`, which translates for ranks and not otherwise."""
    from treeflash.train import distributed
    from treeflash.errors import TreeFlashError

    failure = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer\nmore")
    with pytest.raises(TreeFlashError, match=r"rank 1 of 2 lost contact with the other ranks at step 7 "
                                             r"\(RuntimeError: .*Connection reset by peer\); another rank failed"):
        with distributed.peers(distributed.Ranks(1, 2), 7):
            raise failure
    with pytest.raises(RuntimeError, match="Connection reset") as raised:
        with distributed.peers(distributed.Ranks(), 7):
            raise failure
    assert raised.type is RuntimeError
    with pytest.raises(ValueError):  # not a collective's failure: passes through untouched
        with distributed.peers(distributed.Ranks(1, 2), 7):
            raise ValueError("bad")


@needs_eval_sets
def test_distributed_gpu_recipe_end_to_end_on_tiny_qwen3(tmp_path):
    """docs/gpu-recipe.md on a tiny Qwen3, offline: a z-lab-layout DFlash drafter; regeneration through a
    running server; the feature cache; a TreeFlash head trained on it by 2 torchrun ranks; generation with it
    (lossless); the export for vLLM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import treeflash
    from test_cli import TEMPLATE, WORDS
    from test_serving import running
    from treeflash.cli import main
    from treeflash.serve.app import Server, ServeConfig

    from helpers import tiny_target

    target_dir = tmp_path / "qwen3"
    target = tiny_target("qwen3", dtype=torch.float32)
    target.model.config.eos_token_id = 1
    target.model.generation_config.eos_token_id = 1
    target.model.save_pretrained(target_dir)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                        additional_special_tokens=["<user>", "<assistant>", "<mask>"])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(target_dir)
    t = str(target_dir)

    # 1. A public-format DFlash drafter (here an untrained one in the z-lab layout).
    assert main(["new-drafter", str(tmp_path / "dflash"), "--target", t, "--layers", "1", "--block-size", "4",
                 "--no-head"]) == 0
    layers = json.loads((tmp_path / "dflash" / "config.json").read_text())["dflash_config"]["target_layer_ids"]
    # 2. Regenerate through a serving engine (here `treeflash serve` on loopback).
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"w{i} w{i + 9} w{2 * i}"}) + "\n"
                               for i in range(10)))
    server = Server(treeflash.load(t, "none"), ServeConfig(model_name="tiny-qwen3", max_batch=4))
    with running(server) as (url, _):
        assert main(["train", "data", "--server", url, "--prompts", str(prompts), "--target", t, "--out",
                     str(tmp_path / "data"), "--max-new-tokens", "16", "--batch-size", "4", "--concurrency", "4"]) == 0
    # 3. Cache the layers the drafter reads.
    assert main(["train", "features", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "cache"),
                 "--target", t, "--layers", ",".join(map(str, layers))]) == 0
    # 4. A TreeFlash head on top of the drafter, 2 ranks.
    _torchrun(["-m", "treeflash.cli", "train", "head", "--features", str(tmp_path / "cache"), "--init",
               str(tmp_path / "dflash"), "--out", str(tmp_path / "run"), "--target", t, "--anchors", "3",
               "--batch-size", "2", "--epochs", "1", "--val-sequences", "2", "--export", str(tmp_path / "head")])
    assert "treeflash_config" in json.loads((tmp_path / "head" / "config.json").read_text())
    # 5. Generate with it: exactly the target's greedy output.
    decoder = treeflash.load(t, str(tmp_path / "head"))
    ids = [2, 9, 14, 3]
    ar = decoder.generate(ids, treeflash.DecodeConfig(method="ar", max_new_tokens=16)).token_ids
    assert decoder.generate(ids, treeflash.DecodeConfig(method="treeflash", max_new_tokens=16)).token_ids == ar
    # 6. Export the backbone for vLLM (the head stays with `treeflash serve`).
    assert main(["export", str(tmp_path / "head"), str(tmp_path / "vllm"), "--format", "vllm", "--target", t]) == 0
    assert treeflash.load(t, str(tmp_path / "vllm")).drafter.ar_approximation is None
