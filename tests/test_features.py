"""The target-feature cache: what it stores, resuming, errors, and training from it."""

import json
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

from treeflash.errors import TreeFlashError
from treeflash.train.features import FeatureCache, build_feature_cache, sequence_features
from treeflash.train.blocks import target_pass
from treeflash.train.config import TrainConfig
from treeflash.train.loop import train

from helpers import needs_eval_sets, tiny_drafter, tiny_target
from test_cli import model_dir  # noqa: F401  (the tiny Llama saved to disk with a word-level tokenizer)
from test_training import _fresh, _sequences


def test_cache_holds_the_target_features_and_its_logits(tmp_path):
    target = tiny_target("llama", dtype=torch.float32)
    data = _sequences(target, count=5)
    counts = build_feature_cache(target, data, tmp_path / "c", layers=(1, 2, 4), shard_sequences=2, progress=False)
    assert counts == {"sequences": 5, "tokens": 5 * 24, "shards": 3, "written_now": 3}
    cache = FeatureCache(tmp_path / "c")
    assert [s.id for s in cache.sequences] == [s.id for s in data]
    assert [s.tokens for s in cache.sequences] == [s.tokens for s in data]
    assert [s.prompt_length for s in cache.sequences] == [s.prompt_length for s in data]
    drafter = tiny_drafter(target)  # reads layers (1, 2, 4)
    for cached, seq in zip(cache.sequences, data):
        features, logits = target_pass(target, drafter, torch.tensor(seq.tokens), logits=True)
        torch.testing.assert_close(cache.features(cached, (1, 2, 4)), features, atol=2e-3, rtol=2e-3)
        # A subset of the layers, in another order, is a column selection.
        H = target.hidden_size
        torch.testing.assert_close(cache.features(cached, (4, 1), length=7),
                                   torch.cat((features[:7, 2 * H:], features[:7, :H]), dim=1), atol=2e-3, rtol=2e-3)
        # The final state gives the target's logits (float16 storage: close, and the same greedy tokens).
        recomputed = cache.final(cached) @ target.lm_head.weight.T
        torch.testing.assert_close(recomputed, logits, atol=0.05, rtol=0.01)
        assert torch.equal(recomputed.argmax(-1), logits.argmax(-1))


def test_cache_resumes_at_the_first_unfinished_shard(tmp_path):
    target = tiny_target("llama", dtype=torch.float32)
    data = _sequences(target, count=5)
    out = tmp_path / "c"
    build_feature_cache(target, data[:3], out, layers=(1, 2), shard_sequences=2, progress=False)
    first = np.load(out / "shard-00000.features.npy").copy()
    (out / "shard-00001.json").unlink()  # interrupted before the second shard's index was written
    counts = build_feature_cache(target, data, out, layers=(1, 2), shard_sequences=2, progress=False)
    assert counts["written_now"] == 2  # shard 1 again (now with 2 sequences) and the new shard 2
    assert np.array_equal(np.load(out / "shard-00000.features.npy"), first)
    assert len(FeatureCache(out).sequences) == 5
    assert not list(out.glob("*.tmp*"))


def test_caches_of_disjoint_chunks_read_as_one(tmp_path):
    target = tiny_target("llama", dtype=torch.float32)
    data = _sequences(target, count=5)
    build_feature_cache(target, data, tmp_path / "all", layers=(1, 2), shard_sequences=2, progress=False)
    build_feature_cache(target, data[:3], tmp_path / "a", layers=(1, 2), shard_sequences=2, progress=False)
    build_feature_cache(target, data[3:], tmp_path / "b", layers=(1, 2), shard_sequences=2, progress=False)
    whole, parts = FeatureCache(tmp_path / "all"), FeatureCache(f"{tmp_path / 'a'},{tmp_path / 'b'}")
    assert [s.id for s in parts.sequences] == [s.id for s in whole.sequences] == [s.id for s in data]
    for x, y in zip(whole.sequences, parts.sequences):
        assert torch.equal(whole.features(x, (2,)), parts.features(y, (2,)))
        assert torch.equal(whole.final(x), parts.final(y))
    with pytest.raises(TreeFlashError, match="both hold sequence"):
        FeatureCache(f"{tmp_path / 'a'},{tmp_path / 'all'}")
    build_feature_cache(target, data[3:], tmp_path / "c", layers=(1, 3), progress=False)
    with pytest.raises(TreeFlashError, match="different targets or layers"):
        FeatureCache(f"{tmp_path / 'a'},{tmp_path / 'c'}")


def test_cache_errors_are_clear(tmp_path, monkeypatch):
    target = tiny_target("llama", dtype=torch.float32)
    data = _sequences(target, count=3)
    with pytest.raises(TreeFlashError, match="not all layers"):
        build_feature_cache(target, data, tmp_path / "a", layers=(1, 9), progress=False)
    build_feature_cache(target, data, tmp_path / "b", layers=(1, 2), progress=False)
    with pytest.raises(TreeFlashError, match="other settings"):
        build_feature_cache(target, data, tmp_path / "b", layers=(1, 3), progress=False)
    with pytest.raises(TreeFlashError, match="not a feature cache"):
        FeatureCache(tmp_path / "nothing")
    cache = FeatureCache(tmp_path / "b")
    with pytest.raises(TreeFlashError, match="holds target layers"):
        cache.check(target, (1, 4))
    with pytest.raises(TreeFlashError, match="not shaped like"):
        cache.check(tiny_target("llama", dtype=torch.float32, vocab=50), (1, 2))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 4096))
    with pytest.raises(TreeFlashError, match="GiB are free"):
        build_feature_cache(target, data, tmp_path / "d", layers=(1, 2), progress=False)
    assert not list((tmp_path / "d").glob("shard-*"))  # nothing half-written


def test_training_from_the_cache_matches_training_online(tmp_path):
    """The cache changes where features come from, not what is trained: the same run online and from the
    cache logs the same losses up to float16 rounding of the features."""
    target = tiny_target("llama", dtype=torch.float32)
    data = _sequences(target)
    build_feature_cache(target, data, tmp_path / "c", layers=(1, 2, 4), progress=False)
    config = dict(epochs=2, lr=3e-3, anchors=6, val_sequences=2, eval_every=1000, save_every=1000, batch_size=2,
                  loss="ce+kl")
    train(_fresh(target), target, data, TrainConfig(**config), tmp_path / "online", progress=False, log=lambda m: None)
    cached = train(_fresh(target), target, None, TrainConfig(**config, features=str(tmp_path / "c")),
                   tmp_path / "cached", progress=False, log=lambda m: None)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("online", "cached")]
    assert len(losses[0]) == len(losses[1]) == 4
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-3)
    assert cached["complete"] and 0 <= cached["anchor_sensitivity"]


def test_sequence_features_are_the_requested_layers_and_the_final_state():
    target = tiny_target("qwen3", dtype=torch.float64)
    tokens = torch.arange(10)
    features, final = sequence_features(target, tokens, (4, 1))
    with torch.no_grad():
        states = target.model(tokens[None], output_hidden_states=True).hidden_states
    H = target.hidden_size
    torch.testing.assert_close(features[:, :H], states[5][0])
    torch.testing.assert_close(features[:, H:], states[2][0])
    torch.testing.assert_close(final, states[-1][0])  # HF's last entry is after the final norm


def test_head_training_reads_the_cache_for_its_kl_targets(tmp_path):
    """The head stage's KL targets come from the cached final states: it trains from the cache alone and
    moves only the head."""
    target = tiny_target("llama", dtype=torch.float32)
    data = _sequences(target)
    build_feature_cache(target, data, tmp_path / "c", layers=(1, 2, 4), progress=False)
    drafter = _fresh(target)
    backbone = {k: v.clone() for k, v in drafter.state_dict().items() if not k.startswith("ar_")}
    config = TrainConfig(stage="head", features=str(tmp_path / "c"), epochs=6, lr=3e-3, anchors=6, batch_size=2,
                         val_sequences=2, eval_every=1000, save_every=1000)
    metrics = train(drafter, target, None, config, tmp_path / "run", progress=False, log=lambda m: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])
    assert torch.count_nonzero(drafter.ar_approximation.d.weight) > 0
    assert all(torch.equal(v, drafter.state_dict()[k]) for k, v in backbone.items())
    assert metrics["conditional_chain_tau"] >= 1.0


# -- features captured while regenerating -------------------------------------------------------------


def test_generating_captures_the_features_of_every_token_it_feeds():
    """`generate_with_features` keeps, for every token of prompt and response (the last included), what one
    target pass over the whole sequence gives, and changes no token."""
    from treeflash.decoding import DecodeConfig, Decoder
    from treeflash.train.capture import generate_with_features

    target = tiny_target("llama", dtype=torch.float32)
    decoder = Decoder(target)
    prompts = [[3 + (5 * i + j) % 40 for j in range(2 + 3 * i)] for i in range(4)]  # unequal lengths
    configs = [DecodeConfig(method="ar", max_new_tokens=n, stop_at_eos=False) for n in (1, 9, 6, 12)]
    plain = decoder.generate_batch(prompts, configs, max_batch=3)
    layers = (1, 5, 3)
    captured, features = generate_with_features(decoder, prompts, configs, layers, max_batch=3)
    for p, r, c, f in zip(prompts, plain, captured, features):
        assert c.token_ids == r.token_ids
        tokens = torch.tensor(p + c.token_ids)
        assert f.dtype == torch.float16 and f.shape == (len(tokens), 3 * target.hidden_size)
        whole, _ = sequence_features(target, tokens, layers)
        torch.testing.assert_close(f.float(), whole, atol=2e-3, rtol=2e-3)
    with pytest.raises(TreeFlashError, match="for method 'ar'"):
        generate_with_features(Decoder(target, tiny_drafter(target)), prompts[:1], [DecodeConfig(method="ddtree")],
                               layers)
    with pytest.raises(TreeFlashError, match="not all layers of the target"):
        generate_with_features(decoder, prompts[:1], [DecodeConfig(method="ar")], (1, 99))


def _tiny_model_and_tokenizer(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(model_dir))


def test_regeneration_writes_the_feature_cache_of_its_records(model_dir, tmp_path):  # noqa: F811
    """`regenerate(features_out=...)`: shard i of the cache holds data shard i, as `treeflash train features`
    would cache it; data shards written before without features get a feature pass at the end, and so does a
    cache shard lost to an interruption."""
    from treeflash.train.prompts import Prompt
    from treeflash.train.records import load_sequences
    from treeflash.train.regenerate import regenerate
    from treeflash.targets import Target

    model, tokenizer = _tiny_model_and_tokenizer(model_dir)
    target = Target(model, tokenizer)
    prompts = [Prompt(f"p{i}", " ".join(f"w{(7 * i + 3 * j) % 90 + 3}" for j in range(1 + i % 4))) for i in range(7)]
    out, cache = tmp_path / "data", tmp_path / "features"
    settings = dict(max_new_tokens=10, batch_size=3, progress=False)
    regenerate(target, tokenizer, prompts[:3], out, **settings)  # one shard without features
    counts = regenerate(target, tokenizer, prompts, out, features_out=cache, feature_layers=(0, 2), **settings)
    assert counts["written_now"] == 4 and counts["feature_shards_filled"] == 1 and counts["shards"] == 3
    records = load_sequences(out)
    cached = FeatureCache(cache)
    assert cached.layers == (0, 2) and json.loads((cache / "cache.json").read_text())["shard_sequences"] == 3
    assert [(s.id, s.tokens, s.prompt_length) for s in cached.sequences] == \
        [(s.id, s.tokens, s.prompt_length) for s in records]
    build_feature_cache(target, records, tmp_path / "reference", layers=(0, 2), shard_sequences=3, progress=False)
    reference = FeatureCache(tmp_path / "reference")
    for x, y in zip(cached.sequences, reference.sequences):
        torch.testing.assert_close(cached.features(x, (0, 2)), reference.features(y, (0, 2)), atol=4e-3, rtol=4e-3)
        torch.testing.assert_close(cached.final(x), reference.final(y), atol=4e-3, rtol=4e-3)
    # An interrupted run that lost a cache shard's index: the rerun regenerates nothing and refills it.
    before = (out / "shard-00001.jsonl.gz").read_bytes()
    (cache / "shard-00001.json").unlink()
    # Until then the cache reads the shards it has, around the gap.
    assert [s.id for s in FeatureCache(cache).sequences] == [s.id for s in records[:3] + records[6:]]
    counts = regenerate(target, tokenizer, prompts, out, features_out=cache, feature_layers=(0, 2), **settings)
    assert counts["written_now"] == 0 and counts["feature_shards_filled"] == 1
    assert (out / "shard-00001.jsonl.gz").read_bytes() == before and len(FeatureCache(cache).sequences) == 7
    with pytest.raises(TreeFlashError, match="other settings"):
        regenerate(target, tokenizer, prompts, out, features_out=cache, feature_layers=(1, 2), **settings)
    with pytest.raises(TreeFlashError, match="needs the treeflash engine"):
        regenerate(model, tokenizer, prompts, out, features_out=cache, engine="transformers", **settings)
    # Data made with other settings is refused before a new feature cache is started.
    with pytest.raises(TreeFlashError, match="holds data made with other settings"):
        regenerate(target, tokenizer, prompts, out, features_out=tmp_path / "new-cache", feature_layers=(0, 2),
                   **(settings | {"max_new_tokens": settings["max_new_tokens"] + 1}))
    assert not (tmp_path / "new-cache").exists()


@needs_eval_sets
def test_train_data_cli_caches_features_that_training_reads(model_dir, tmp_path, capsys):  # noqa: F811
    from treeflash.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"w{i + 3} w{2 * i + 5}"}) + "\n" for i in range(3)))
    out, cache = tmp_path / "data", tmp_path / "features"
    argv = ["train", "data", "--prompts", str(prompts), "--target", str(model_dir), "--out", str(out),
            "--max-new-tokens", "5", "--batch-size", "2"]
    assert main(argv + ["--features", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)["feature_shards_filled"] == 0
    assert len(FeatureCache(cache).sequences) == 3
    assert main(["train", "drafter", "--features", str(cache), "--target", str(model_dir), "--out",
                 str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--layers", "1"]) == 0
    capsys.readouterr()
    for extra, message in ((["--layers", "1,2"], "pass --features DIR too"),
                           (["--features", str(cache), "--layers", "1,x"], "comma-separated layer numbers"),
                           (["--features", str(cache), "--engine", "transformers"], "needs the treeflash engine")):
        assert main(argv + extra) == 2
        assert message in capsys.readouterr().err
