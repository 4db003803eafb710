"""The `treeflash` command line on a tiny model saved to disk with a word-level tokenizer (hermetic)."""

import json

import pytest
import torch

from treeflash.cli import main

from helpers import tiny_target

WORDS = ["<unk>", "<eos>", "<user>", "<assistant>", "<mask>"] + [f"w{i}" for i in range(92)]
TEMPLATE = "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    target = tiny_target("llama", dtype=torch.float32)
    target.model.config.eos_token_id = 1
    target.model.generation_config.eos_token_id = 1
    target.model.save_pretrained(path)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                        additional_special_tokens=["<user>", "<assistant>", "<mask>"])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def _run_json(capsys, *argv):
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_fields_and_methods_agree(model_dir, capsys):
    results = {}
    for method in ("ar", "dflash", "ddtree", "treeflash"):
        out = _run_json(capsys, "w3 w9 w27", "--target", str(model_dir), "--drafter", "untrained",
                        "--method", method, "--max-new-tokens", "20", "--ignore-eos")
        assert {"method", "text", "token_ids", "new_tokens", "rounds", "tau", "seconds", "tokens_per_second"} <= set(out)
        assert out["method"] == method and out["new_tokens"] == len(out["token_ids"]) == 20
        results[method] = out["token_ids"]
    assert len({tuple(v) for v in results.values()}) == 1


def test_chat_template_is_applied_unless_no_chat(model_dir, capsys):
    chat = _run_json(capsys, "w3 w9", "--target", str(model_dir), "--method", "ar", "--max-new-tokens", "3")
    raw = _run_json(capsys, "w3 w9", "--target", str(model_dir), "--method", "ar", "--max-new-tokens", "3", "--no-chat")
    assert chat["prompt_tokens"] == 4 and raw["prompt_tokens"] == 2  # <user> w3 w9 <assistant>


def test_streams_text_and_prints_stats(model_dir, capsys):
    assert main(["generate", "w5 w6", "--target", str(model_dir), "--drafter", "untrained", "--method", "ddtree",
                 "--max-new-tokens", "12", "--budget", "8", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().startswith("w")
    assert "[ddtree + lookup 8] 12 tokens" in captured.err and "tau" in captured.err and "verify" in captured.err


def test_lookup_flags_reach_the_decoder(model_dir, capsys):
    ar = _run_json(capsys, "w5 w6", "--target", str(model_dir), "--method", "ar", "--max-new-tokens", "16",
                   "--ignore-eos", "--lookup", "0")
    grafted = _run_json(capsys, "w5 w6", "--target", str(model_dir), "--drafter", "untrained", "--method", "ddtree",
                        "--max-new-tokens", "16", "--ignore-eos", "--lookup", "5", "--lookup-ngram", "1")
    assert grafted["lookup"] == 5 and ar["lookup"] == 0 and grafted["token_ids"] == ar["token_ids"]
    assert main(["generate", "w5", "--target", str(model_dir), "--lookup-ngram", "9"]) == 2
    assert "lookup_ngram must be a whole number from 1 to 4" in capsys.readouterr().err


def test_tree_size_is_the_budget_plus_the_root(model_dir, capsys):
    out = _run_json(capsys, "w5", "--target", str(model_dir), "--drafter", "untrained", "--method", "ddtree",
                    "--tree-size", "10", "--max-new-tokens", "5")
    assert out["budget"] == 9


def test_seeded_sampling_is_reproducible(model_dir, capsys):
    args = ["w5 w7", "--target", str(model_dir), "--drafter", "untrained", "--max-new-tokens", "15",
            "--temperature", "1.0", "--seed", "3", "--ignore-eos"]
    a = _run_json(capsys, *args, "--method", "treeflash")
    b = _run_json(capsys, *args, "--method", "ar")
    assert a["token_ids"] == b["token_ids"] and a["seed"] == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "0"], "budget must be"),
        (["--temperature", "-1"], "temperature"),
        (["--tree-size", "1"], "tree_size"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_bad_flags_are_one_sentence_errors(model_dir, capsys, argv, message):
    assert main(["generate", "w1", "--target", str(model_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("treeflash: error:") and message in err and "Traceback" not in err


def test_empty_prompt_and_missing_paths_are_errors(model_dir, tmp_path, capsys):
    assert main(["generate", "   ", "--target", str(model_dir), "--method", "ar"]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "w1", "--target", str(model_dir), "--drafter", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_new_drafter_writes_a_loadable_checkpoint(model_dir, tmp_path, capsys):
    out = tmp_path / "drafter"
    assert main(["new-drafter", str(out), "--target", str(model_dir), "--layers", "2", "--block-size", "6"]) == 0
    assert "untrained 2-layer drafter" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["block_size"] == 6 and config["dflash_config"]["mask_token_id"] == 4  # <mask>, unused by the template
    result = _run_json(capsys, "w5", "--target", str(model_dir), "--drafter", str(out), "--method", "treeflash",
                       "--max-new-tokens", "6")
    assert result["method"] == "treeflash"


def test_train_average_writes_a_loadable_average_and_never_overwrites(model_dir, tmp_path, capsys):
    from treeflash.drafters import load_drafter

    for seed in (1, 2):
        assert main(["new-drafter", str(tmp_path / f"d{seed}"), "--target", str(model_dir), "--layers", "1",
                     "--block-size", "4", "--seed", str(seed)]) == 0
    drafters = [str(tmp_path / "d1"), str(tmp_path / "d2")]
    assert main(["train", "average", str(tmp_path / "avg"), *drafters, "--dtype", "float32"]) == 0
    assert "average of 2 drafters (float32)" in capsys.readouterr().out
    a, b, mean = (load_drafter(p) for p in [*drafters, tmp_path / "avg"])
    assert torch.allclose(mean.fc.weight, (a.fc.weight + b.fc.weight) / 2, atol=1e-6)
    config = json.loads((tmp_path / "avg" / "config.json").read_text())
    assert config["averaged_from"] == drafters and config["dtype"] == "float32"
    before = (tmp_path / "d1" / "model.safetensors").read_bytes()
    assert main(["train", "average", str(tmp_path / "d1"), *drafters]) == 2  # into an input: refused
    assert "not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "d1" / "model.safetensors").read_bytes() == before
    assert main(["train", "average", str(tmp_path / "x"), *drafters, "--dtype", "float13"]) == 2
    assert "unknown dtype" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_tune_saves_defaults_that_generate_then_uses(model_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TREEFLASH_CACHE", str(tmp_path))
    common = ["--target", str(model_dir), "--drafter", "untrained"]
    assert main(["tune", *common, "--budgets", "3,5", "--candidate-tokens", "2", "--lookups", "0,2", "--prompts", "1",
                 "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "| treeflash |" in out and "saved to" in out and " lookup " in out
    saved = json.loads(next((tmp_path / "tuned").glob("*.json")).read_text())
    tuned = saved["best"]["treeflash"]["budget"]
    assert tuned in (3, 5) and saved["command"].startswith("treeflash tune --target")
    tuned_lookup = saved["best"]["treeflash"]["lookup"]
    assert tuned_lookup in (0, 2, 8)
    result = _run_json(capsys, "w3 w9", *common, "--method", "treeflash", "--max-new-tokens", "4")
    assert result["budget"] == tuned and result["lookup"] == tuned_lookup
    assert _run_json(capsys, "w3 w9", *common, "--method", "treeflash", "--budget", "7",
                     "--max-new-tokens", "4")["budget"] == 7


@pytest.mark.parametrize("flags, message", [
    (["--budgets", "4,x"], "comma-separated whole numbers"),
    (["--budgets", "0"], "budget must be"),
    (["--prompts", "9"], "--prompts must be between"),
    (["--lookups", "8,-1"], "--lookups must be whole numbers"),
])
def test_bad_tune_flags_are_clear_errors(model_dir, capsys, flags, message):
    assert main(["tune", "--target", str(model_dir), "--drafter", "untrained", "--dry-run", *flags]) == 2
    assert message in capsys.readouterr().err


def test_train_features_then_a_drafter_from_them(model_dir, tmp_path, capsys):
    """`train features` caches the target once; `train drafter --features` trains without the target's
    passes, resumes, and exports a drafter that `generate` uses losslessly."""
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "data"
    data.mkdir()
    records = [{"id": f"r{i}", "prompt_ids": torch.randint(5, 97, (4,), generator=g).tolist(),
                "response_ids": torch.randint(5, 97, (12,), generator=g).tolist()} for i in range(6)]
    (data / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cache = tmp_path / "cache"
    assert main(["train", "features", "--data", str(data), "--out", str(cache), "--target", str(model_dir),
                 "--shard-sequences", "4"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"sequences": 6, "tokens": 96, "shards": 2,
                                                                   "written_now": 2}
    run = ["train", "drafter", "--features", str(cache), "--out", str(tmp_path / "run"), "--target", str(model_dir),
           "--block-size", "4", "--target-layers", "2", "--anchors", "4", "--batch-size", "2", "--epochs", "3",
           "--val-sequences", "2", "--eval-every", "2", "--export", str(tmp_path / "drafter")]
    assert main(run + ["--max-steps", "2"]) == 0  # a first sitting: not complete, nothing exported
    assert not (tmp_path / "drafter").exists()
    assert main(run) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert metrics["step"] == 6 and metrics["complete"] and "anchor_sensitivity" in metrics
    config = json.loads((tmp_path / "drafter" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["block_size"] == 4
    assert config["dflash_config"]["target_layer_ids"] == [1, 3]
    ar = _run_json(capsys, "w5 w6", "--target", str(model_dir), "--method", "ar", "--max-new-tokens", "12")
    ours = _run_json(capsys, "w5 w6", "--target", str(model_dir), "--drafter", str(tmp_path / "drafter"),
                     "--max-new-tokens", "12")
    assert ours["token_ids"] == ar["token_ids"]
    # --max-steps 0 validates a drafter as it is and writes nothing: the baseline of a continued run.
    check = ["train", "head", "--features", str(cache), "--out", str(tmp_path / "check"), "--target", str(model_dir),
             "--init", str(tmp_path / "drafter"), "--anchors", "4", "--batch-size", "2", "--val-sequences", "2",
             "--max-steps", "0"]
    assert main(check) == 0
    out = capsys.readouterr()
    metrics = json.loads(out.out.splitlines()[-1])
    assert metrics["step"] == 0 and "conditional_chain_tau" in metrics and "validation only" in out.err
    assert not list((tmp_path / "check").iterdir())
    # --held-out FILE validates on the records that run held out: here the same as the hashed split.
    assert main(check + ["--held-out", str(tmp_path / "run" / "held_out.json")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["conditional_chain_tau"] == metrics["conditional_chain_tau"]
    (tmp_path / "other.json").write_text('["nowhere"]')
    assert main(check + ["--held-out", str(tmp_path / "other.json")]) == 2
    assert "1 of the 1 held-out records (e.g. nowhere) are not in this data" in capsys.readouterr().err
    # --add-layers grows the --init drafter; it validates exactly as the drafter it grew from.
    assert main(check[:-2] + ["--max-steps", "0", "--add-layers", "1"]) == 0
    out = capsys.readouterr()
    grown = json.loads(out.out.splitlines()[-1])
    assert "grew the drafter to 2 layers" in out.err
    assert grown["conditional_chain_tau"] == metrics["conditional_chain_tau"]
    assert grown["marginal_top1"] == metrics["marginal_top1"]
    assert main(["train", "drafter", "--features", str(cache), "--out", str(tmp_path / "x"), "--target", str(model_dir),
                 "--add-layers", "1"]) == 2
    assert "--add-layers grows the --init drafter" in capsys.readouterr().err


def test_train_features_skip_caches_a_later_chunk(model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    records = [{"id": f"r{i}", "prompt_ids": [5, 6, 7], "response_ids": [8 + i, 9, 10]} for i in range(5)]
    (data / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    base = ["train", "features", "--data", str(data), "--target", str(model_dir)]
    assert main(base + ["--out", str(tmp_path / "c"), "--skip", "3"]) == 0
    from treeflash.train.features import FeatureCache

    assert [s.id for s in FeatureCache(tmp_path / "c").sequences] == ["r3", "r4"]
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "d"), "--skip", "5"]) == 2
    assert "leaves none of the 5 sequences" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "d"), "--skip", "-1"]) == 2
    assert "--skip must be 0 or more" in capsys.readouterr().err


def test_train_features_in_two_workers_equals_one_process(model_dir, tmp_path, capsys):
    import numpy as np

    from treeflash.train.features import FeatureCache

    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(1)
    records = [{"id": f"r{i}", "prompt_ids": torch.randint(5, 97, (3,), generator=g).tolist(),
                "response_ids": torch.randint(5, 97, (6,), generator=g).tolist()} for i in range(5)]
    (data / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    base = ["train", "features", "--data", str(data), "--target", str(model_dir), "--shard-sequences", "2"]
    assert main(base + ["--out", str(tmp_path / "one")]) == 0
    assert main(base + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["written_now"] == 3
    one, two = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "two")
    assert [(s.id, s.tokens, s.shard) for s in one.sequences] == [(s.id, s.tokens, s.shard) for s in two.sequences]
    for a, b in zip(one.sequences, two.sequences):
        assert np.allclose(one.features(a, one.layers), two.features(b, two.layers), atol=1e-3)
    assert not list((tmp_path / "two").glob("*.tmp*"))
    # A worker's failure stops the others and says which and why; the finished shards stay.
    other = ["--out", str(tmp_path / "two"), "--workers", "2", "--layers", "1"]
    assert main(base + other) == 2
    err = capsys.readouterr().err
    assert "feature worker" in err and "other settings" in err and "run the same command again" in err
    assert len(FeatureCache(tmp_path / "two").sequences) == 5


def test_train_drafter_needs_data_or_features(model_dir, tmp_path, capsys):
    assert main(["train", "drafter", "--out", str(tmp_path / "run"), "--target", str(model_dir)]) == 2
    assert "pass --data" in capsys.readouterr().err
    assert main(["train", "drafter", "--features", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--target", str(model_dir)]) == 2
    assert "not a feature cache" in capsys.readouterr().err


def test_export_takes_the_target_a_checkpoint_names(model_dir, tmp_path, capsys):
    """A drafter with a reduced draft vocabulary exports for vLLM without --target when its config names a target
    that is here (a local directory, or the embedded default); a target that is not here asks for --target."""
    from treeflash.drafters import new_drafter, save_drafter
    from treeflash.targets import load_target

    target = load_target(str(model_dir))
    drafter = new_drafter(target, num_hidden_layers=1, block_size=4, draft_vocab=torch.arange(3, 40))
    save_drafter(drafter, tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["target_model"] == str(model_dir)
    assert main(["export", str(tmp_path / "d"), str(tmp_path / "vllm"), "--format", "vllm"]) == 0
    assert json.loads((tmp_path / "vllm" / "config.json").read_text())["draft_vocab_size"] == 37
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps(config | {"target_model": "someone/elsewhere"}))
    assert main(["export", str(tmp_path / "d"), str(tmp_path / "v2"), "--format", "vllm"]) == 2
    assert "target (someone/elsewhere) is not here; pass --target" in capsys.readouterr().err
