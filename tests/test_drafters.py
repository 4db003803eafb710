import json

import pytest
import torch

from treeflash.drafters import Drafter, default_target_layer_ids, load_drafter, new_drafter, save_drafter
from treeflash.errors import TreeFlashError
from treeflash.train.surgery import average_drafters, grow_drafter

from helpers import tiny_drafter, tiny_target


def _context_features(target, n=10, seed=0):
    ids = torch.randint(0, target.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))
    cache = target.new_cache(64)
    return target.forward(ids, torch.arange(n), cache, feature_layers=(1, 2, 4)).features


def test_default_target_layer_ids_follow_dflash():
    assert default_target_layer_ids(36) == (1, 9, 17, 25, 33)
    ids = default_target_layer_ids(30)
    assert ids[0] == 1 and ids[-1] == 27 and len(ids) == 5 and list(ids) == sorted(ids)


def test_untrained_head_is_exactly_dflash():
    target = tiny_target("qwen3")
    drafter = new_drafter(target, num_hidden_layers=1, block_size=6, target_layer_ids=(1, 2, 4),
                          mask_token_id=target.vocab_size - 1)
    block = drafter.draft(target, anchor=3, new_features=_context_features(target), cache=drafter.new_cache(64))
    parents = torch.arange(block.hidden.shape[0])
    assert torch.equal(drafter.conditional_logits(target, block.hidden, parents), block.logits)


def test_incremental_context_equals_full_context():
    """Drafting after adding context in two steps equals drafting with it all at once: the block's own
    keys/values never stay in the drafter cache."""
    target = tiny_target("llama")
    drafter = tiny_drafter(target)
    feats = _context_features(target, n=12)
    full = drafter.draft(target, 7, feats, drafter.new_cache(64))
    cache = drafter.new_cache(64)
    drafter.draft(target, 5, feats[:8], cache)
    assert cache.length == 8
    step = drafter.draft(target, 7, feats[8:], cache)
    assert cache.length == 12
    torch.testing.assert_close(step.logits, full.logits, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(step.hidden, full.hidden, atol=1e-10, rtol=1e-10)


def test_a_grown_drafter_drafts_exactly_as_before_and_its_new_layer_trains(tmp_path):
    """grow_drafter appends layers that start as the identity: the same block hidden states and logits, bit
    for bit, on any context; the deeper drafter saves and loads; training moves the new layer."""
    from treeflash.train.records import Sequence
    from treeflash.train.config import TrainConfig
    from treeflash.train.loop import train

    from helpers import greedy_reference

    target = tiny_target("llama", dtype=torch.float32)
    drafter = tiny_drafter(target).float()
    head = drafter.ar_approximation
    with torch.no_grad():
        head.d.weight.normal_(0, 0.02)  # a trained-looking head, so the conditionals are checked too
    grown = grow_drafter(drafter, 2)
    assert grown.config.num_hidden_layers == drafter.config.num_hidden_layers + 2
    for seed in (0, 1):
        feats = _context_features(target, n=9, seed=seed)
        a = drafter.draft(target, 5, feats, drafter.new_cache(64))
        b = grown.draft(target, 5, feats, grown.new_cache(64))
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.logits, b.logits)
        parents = torch.arange(a.hidden.shape[0])
        assert torch.equal(drafter.conditional_logits(target, a.hidden, parents),
                           grown.conditional_logits(target, b.hidden, parents))
    save_drafter(grown, tmp_path / "grown")
    loaded = load_drafter(tmp_path / "grown", target, dtype=torch.float32)
    assert loaded.config.num_hidden_layers == grown.config.num_hidden_layers
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in grown.state_dict().items())
    with pytest.raises(TreeFlashError, match="at least one layer"):
        grow_drafter(drafter, 0)
    # Training the backbone moves the new layer away from the identity.
    prompt = [5, 9, 2, 7]
    data = [Sequence(f"s{i}", prompt[i:] + prompt[:i] + greedy_reference(target, prompt[i:] + prompt[:i], 12),
                     prompt_length=4) for i in range(4)]
    config = TrainConfig(stage="head", finetune_backbone=True, epochs=2, lr=3e-3, anchors=4, val_sequences=1,
                         eval_every=1000, save_every=1000, batch_size=1)
    train(grown, target, data, config, tmp_path / "run", progress=False, log=lambda m: None)
    new_layer = grown.layers[drafter.config.num_hidden_layers]
    assert torch.count_nonzero(new_layer.self_attn.o_proj.weight) > 0 and torch.count_nonzero(new_layer.mlp.down_proj.weight) > 0


@pytest.mark.parametrize("head", [True, False])
def test_save_load_round_trip(tmp_path, head):
    target = tiny_target("qwen3")
    drafter = tiny_drafter(target, head=head)
    save_drafter(drafter, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["dflash_config"]["target_layer_ids"] == [1, 2, 4]
    assert ("treeflash_config" in config) == head
    loaded = load_drafter(tmp_path / "d", target)
    assert isinstance(loaded, Drafter) and (loaded.ar_approximation is not None) == head
    feats = _context_features(target)
    a = drafter.draft(target, 3, feats, drafter.new_cache(64))
    b = loaded.draft(target, 3, feats, loaded.new_cache(64))
    assert torch.equal(a.logits, b.logits)


def test_save_in_half_precision_loads(tmp_path):
    target = tiny_target("qwen3", dtype=torch.float32)
    drafter = tiny_drafter(target)
    save_drafter(drafter, tmp_path / "d", dtype=torch.bfloat16)
    loaded = load_drafter(tmp_path / "d", target, dtype=torch.float32)
    assert loaded.fc.weight.dtype == torch.float32


def test_bad_checkpoints_get_clear_errors(tmp_path):
    target = tiny_target("qwen3")
    drafter = tiny_drafter(target)
    with pytest.raises(TreeFlashError, match="does not exist"):
        load_drafter(tmp_path / "missing", target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TreeFlashError, match="no config.json"):
        load_drafter(tmp_path / "empty", target)

    save_drafter(drafter, tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(TreeFlashError, match="corrupted"):
        load_drafter(tmp_path / "d", target)
    weights.unlink()
    with pytest.raises(TreeFlashError, match="no .safetensors"):
        load_drafter(tmp_path / "d", target)

    save_drafter(drafter, tmp_path / "e")
    (tmp_path / "e" / "config.json").write_text("{not json")
    with pytest.raises(TreeFlashError, match="not valid JSON"):
        load_drafter(tmp_path / "e", target)

    save_drafter(drafter, tmp_path / "f")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    config["num_hidden_layers"] = 3  # weights for 2 layers
    (tmp_path / "f" / "config.json").write_text(json.dumps(config))
    with pytest.raises(TreeFlashError, match="do not match"):
        load_drafter(tmp_path / "f", target)


def test_drafter_for_another_target_is_rejected(tmp_path):
    target = tiny_target("qwen3")
    save_drafter(tiny_drafter(target), tmp_path / "d")
    with pytest.raises(TreeFlashError, match="vocabulary"):
        load_drafter(tmp_path / "d", tiny_target("qwen3", vocab=50))
    with pytest.raises(TreeFlashError, match="layers"):
        load_drafter(tmp_path / "d", tiny_target("qwen3", layers=4))
    wider = tiny_target("qwen3")
    wider.hidden_size = 48  # as if the target were wider; the check reads this attribute
    with pytest.raises(TreeFlashError, match="hidden size 32"):
        load_drafter(tmp_path / "d", wider)


def test_new_drafter_validates_and_is_reproducible():
    target = tiny_target("llama")
    with pytest.raises(TreeFlashError, match="block size"):
        new_drafter(target, block_size=1)
    a, b = new_drafter(target, seed=3), new_drafter(target, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_draft_vocabulary_logits_are_the_full_logits_of_those_tokens(tmp_path):
    target = tiny_target("llama")
    vocab = torch.tensor([3, 90, 7, 7, 15, 42])  # duplicates collapse, order does not matter
    drafter = new_drafter(target, num_hidden_layers=1, block_size=5, target_layer_ids=(1, 2, 4),
                          mask_token_id=96, draft_vocab=vocab)
    full = new_drafter(target, num_hidden_layers=1, block_size=5, target_layer_ids=(1, 2, 4), mask_token_id=96)
    full.load_state_dict({k: v for k, v in drafter.state_dict().items() if k != "draft_vocab"})
    assert drafter.draft_vocab.tolist() == [3, 7, 15, 42, 90]
    feats = _context_features(target)
    small = drafter.draft(target, 3, feats, drafter.new_cache(64))
    large = full.draft(target, 3, feats, full.new_cache(64))
    torch.testing.assert_close(small.logits, large.logits[:, drafter.draft_vocab], atol=1e-12, rtol=1e-12)
    assert drafter.token_ids(torch.tensor([0, 4])).tolist() == [3, 90]
    assert drafter.draft_index(97)[[3, 90, 4]].tolist() == [0, 4, -1]

    save_drafter(drafter, tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["draft_vocab_size"] == 5
    loaded = load_drafter(tmp_path / "d", target)
    assert loaded.draft_vocab.tolist() == [3, 7, 15, 42, 90]
    assert torch.equal(loaded.draft(target, 3, feats, loaded.new_cache(64)).logits, small.logits)

    with pytest.raises(TreeFlashError, match="draft vocabulary"):
        new_drafter(target, draft_vocab=torch.tensor([5, 500]))


def test_average_of_drafters_is_the_mean_of_their_weights(tmp_path):
    target = tiny_target("qwen3", dtype=torch.float32)
    a, b = tiny_drafter(target, seed=1), tiny_drafter(target, seed=2)
    save_drafter(a, tmp_path / "a")
    save_drafter(b, tmp_path / "b")
    mean = average_drafters([tmp_path / "a", tmp_path / "b"])
    for (name, x), y, z in zip(mean.state_dict().items(), a.state_dict().values(), b.state_dict().values()):
        assert torch.allclose(x, (y + z) / 2, atol=1e-6), name
    assert not torch.equal(mean.fc.weight, a.fc.weight)
    same = average_drafters([tmp_path / "a", tmp_path / "a", tmp_path / "a"])  # three equal drafters: the same one
    feats = _context_features(target)
    assert torch.allclose(same.draft(target, 3, feats, same.new_cache(64)).logits,
                          a.draft(target, 3, feats, a.new_cache(64)).logits, atol=1e-5)


def test_averaging_refuses_one_drafter_or_drafters_of_different_shapes(tmp_path):
    target = tiny_target("qwen3", dtype=torch.float32)
    save_drafter(tiny_drafter(target, layers=2), tmp_path / "two")
    save_drafter(tiny_drafter(target, layers=1), tmp_path / "one")
    save_drafter(tiny_drafter(target, head=False), tmp_path / "plain")
    with pytest.raises(TreeFlashError, match="at least two drafters"):
        average_drafters([tmp_path / "two"])
    with pytest.raises(TreeFlashError, match="differs from .* in its config"):
        average_drafters([tmp_path / "two", tmp_path / "one"])
    with pytest.raises(TreeFlashError, match="differs from"):
        average_drafters([tmp_path / "two", tmp_path / "plain"])
