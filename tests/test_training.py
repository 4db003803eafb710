import json

import pytest
import torch

from treeflash.train.records import Sequence, load_sequences
from treeflash.errors import TreeFlashError
from treeflash.train.blocks import block_attention_mask, drafter_hidden, make_blocks, sample_anchors, target_pass
from treeflash.train.config import TrainConfig
from treeflash.train.loop import train
from treeflash.train.loss import position_weights
from treeflash.train.validation import split_validation, validation_count

from helpers import tiny_drafter, tiny_target


def test_anchors_come_from_response_positions():
    g = torch.Generator().manual_seed(0)
    # prompt of 5 tokens, 10 in all: anchors p with p + 1 in the response (p >= 4) and p + 1 < 10.
    assert sample_anchors(5, 10, 100, g).tolist() == [4, 5, 6, 7, 8]
    few = sample_anchors(5, 10, 3, g)
    assert few.numel() == 3 and set(few.tolist()) <= {4, 5, 6, 7, 8} and few.tolist() == sorted(few.tolist())
    assert sample_anchors(1, 4, 10, g).tolist() == [1, 2]  # p >= 1: the drafter needs some context
    assert sample_anchors(9, 10, 10, g).tolist() == [8]  # one response token: one anchor before it
    assert sample_anchors(10, 10, 10, g).numel() == 0  # no response at all
    # A prompt longer than max_length leaves a sequence cut inside its prompt: no anchor, no error.
    assert sample_anchors(1500, 1024, 10, g).numel() == 0 and sample_anchors(1500, 1024, 10, g).dtype == torch.int64


def test_blocks_by_hand():
    tokens = torch.arange(10, 20)  # positions 0..9 hold 10..19
    b = make_blocks(tokens, torch.tensor([4, 7]), block_size=4, mask_token_id=99)
    assert b.tokens.tolist() == [14, 99, 99, 99, 17, 99, 99, 99]
    assert b.positions.tolist() == [4, 5, 6, 7, 7, 8, 9, 10]
    assert b.labels.tolist() == [-100, 15, 16, 17, -100, 18, 19, -100]  # position 10 is past the end
    assert b.parents.tolist()[:7] == [13, 14, 15, 16, 16, 17, 18]
    assert b.offsets.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_block_mask_by_hand():
    mask = block_attention_mask(torch.tensor([2, 4]), block_size=2, context_length=5).int()
    assert mask.tolist() == [
        # context 0..4  | block 0 | block 1
        [1, 1, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 1, 1],
    ]


def test_position_weights():
    w = position_weights(16, 7.0)
    assert w[0] == 0 and w[1] == 1 and torch.isclose(w[8], torch.exp(torch.tensor(-1.0)))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_block_sparse_pass_equals_each_block_alone(family):
    """All blocks of a sequence in one masked pass give what each block gives when drafted on its own
    at inference, with exactly the context strictly before its anchor."""
    target = tiny_target(family)
    drafter = tiny_drafter(target, block_size=5)
    tokens = torch.randint(0, target.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    anchors = torch.tensor([3, 9, 10, 27])
    blocks = make_blocks(tokens, anchors, 5, drafter.config.mask_token_id)
    features, _ = target_pass(target, drafter, tokens, logits=False)
    with torch.no_grad():
        together = drafter_hidden(drafter, target, tokens, blocks, anchors, features).view(4, 5, -1)
    for j, p in enumerate(anchors.tolist()):
        alone = drafter.draft(target, int(tokens[p]), features[:p], drafter.new_cache(64))
        torch.testing.assert_close(together[j, 1:], alone.hidden, atol=1e-9, rtol=1e-9)


def _sequences(target, count=6, length=24, seed=0):
    """Like `treeflash train data`: random 4-token prompts and the target's own greedy responses."""
    from helpers import greedy_reference

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt = torch.randint(0, target.vocab_size - 1, (4,), generator=g).tolist()
        out.append(Sequence(f"s{i}", prompt + greedy_reference(target, prompt, length - 4), prompt_length=4))
    return out


def _fresh(target, block_size=4):
    """A drafter as `treeflash train drafter` starts one: standard small init, zero head."""
    from treeflash.drafters import new_drafter

    return new_drafter(target, num_hidden_layers=2, block_size=block_size, target_layer_ids=(1, 2, 4),
                       mask_token_id=target.vocab_size - 1, ar_intermediate_size=48).float()


def _config(**kw):
    base = dict(epochs=8, lr=3e-3, anchors=6, val_sequences=2, eval_every=1000, save_every=1000, warmup=0.1,
                batch_size=1)
    return TrainConfig(**(base | kw))


def test_drafter_loss_decreases_and_validation_improves(tmp_path):
    from treeflash.train.validation import evaluate

    target = tiny_target("llama", dtype=torch.float32)
    drafter = _fresh(target)
    data, config = _sequences(target), _config()
    before = evaluate(drafter, target, data, config)
    metrics = train(drafter, target, data, config, tmp_path / "run", progress=False, log=lambda m: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in log[:4]) / 4
    last = sum(r["loss"] for r in log[-4:]) / 4
    assert last < 0.5 * first
    assert "marginal_chain_tau" in metrics and len(metrics["marginal_top1"]) == 3
    # The sequences it trained on (memorised): far more of each block agrees with the target than before.
    after = evaluate(drafter, target, data, config)
    assert before["marginal_chain_tau"] < 1.3 and after["marginal_chain_tau"] > 2.0
    # The head stayed zero: the drafter stage trains the backbone only.
    assert torch.count_nonzero(drafter.ar_approximation.d.weight) == 0


def test_training_with_a_draft_vocabulary(tmp_path):
    from treeflash.drafters import new_drafter
    from treeflash.train.surgery import draft_vocabulary
    from treeflash.train.validation import evaluate

    target = tiny_target("llama", dtype=torch.float32)
    data, config = _sequences(target), _config()
    vocab, coverage = draft_vocabulary(data, 12, always=(0,))
    assert vocab.numel() == 12 and 0 in vocab.tolist() and 0 < coverage <= 1
    drafter = new_drafter(target, num_hidden_layers=2, block_size=4, target_layer_ids=(1, 2, 4),
                          mask_token_id=target.vocab_size - 1, draft_vocab=vocab).float()
    train(drafter, target, data, config, tmp_path / "run", progress=False, log=lambda m: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in log[-4:]) < 0.5 * sum(r["loss"] for r in log[:4])
    assert evaluate(drafter, target, data, config)["marginal_chain_tau"] > 1.5


def test_head_training_moves_only_the_head(tmp_path):
    target = tiny_target("llama", dtype=torch.float32)
    drafter = _fresh(target)
    backbone = {k: v.clone() for k, v in drafter.state_dict().items() if not k.startswith("ar_")}
    train(drafter, target, _sequences(target), _config(stage="head", epochs=6), tmp_path / "run", progress=False,
          log=lambda m: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # One sequence per step, 4 training sequences: an epoch's mean compares like with like (single steps do not).
    assert len(losses) == 24 and sum(losses[-4:]) < sum(losses[:4]), losses
    assert torch.count_nonzero(drafter.ar_approximation.d.weight) > 0
    assert all(torch.equal(v, drafter.state_dict()[k]) for k, v in backbone.items())


def test_resume_reproduces_the_same_state(tmp_path):
    target = tiny_target("qwen3", dtype=torch.float32)
    data = _sequences(target, count=5)
    config = _config(epochs=2, save_every=1)
    straight = _fresh(target)
    train(straight, target, data, config, tmp_path / "a", progress=False, log=lambda m: None)
    resumed = _fresh(target)
    train(resumed, target, data, config, tmp_path / "b", max_steps=3, progress=False, log=lambda m: None)
    again = _fresh(target)  # a fresh process would start here
    train(again, target, data, config, tmp_path / "b", progress=False, log=lambda m: None)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_resume_with_other_settings_is_refused(tmp_path):
    target = tiny_target("llama", dtype=torch.float32)
    drafter = tiny_drafter(target, block_size=4).float()
    train(drafter, target, _sequences(target), _config(epochs=1), tmp_path / "r", progress=False, log=lambda m: None)
    with pytest.raises(TreeFlashError, match="other settings"):
        train(drafter, target, _sequences(target), _config(epochs=1, lr=1e-3), tmp_path / "r", progress=False,
              log=lambda m: None)


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(tmp_path):
    from treeflash.train.loop import STATE_FILE

    target = tiny_target("llama", dtype=torch.float32)
    drafter = tiny_drafter(target, block_size=4).float()
    config = _config(epochs=1)
    train(drafter, target, _sequences(target), config, tmp_path / "r", progress=False, log=lambda m: None, max_steps=2)
    state_file = tmp_path / "r" / STATE_FILE
    state = torch.load(state_file, weights_only=False)
    del state["meta"]["config"]["labels"]  # as written before --labels existed
    torch.save(state, state_file)
    metrics = train(drafter, target, _sequences(target), config, tmp_path / "r", progress=False, log=lambda m: None)
    assert metrics["step"] > 2
    state = torch.load(state_file, weights_only=False)
    state["meta"]["config"]["labels"] = "target"  # a setting that differs from the default still refuses
    torch.save(state, state_file)
    with pytest.raises(TreeFlashError, match="other settings"):
        train(drafter, target, _sequences(target), config, tmp_path / "r", progress=False, log=lambda m: None)


def test_several_data_directories_are_read_in_order_and_a_shared_record_is_refused(tmp_path):
    def shard(name, records):
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard-00000.jsonl").write_text(
            "".join(json.dumps({"id": i, "prompt_ids": [1, 2], "response_ids": r}) + "\n" for i, r in records))

    shard("a", [("a0", [3, 4]), ("a1", [5, 6, 7])])
    shard("b", [("b0", [8, 9])])
    shard("c", [("a1", [5, 6, 7])])
    both = load_sequences(f"{tmp_path / 'a'},{tmp_path / 'b'}")
    assert [s.id for s in both] == ["a0", "a1", "b0"]
    assert both[1].tokens == [1, 2, 5, 6, 7] and both[1].prompt_length == 2
    reordered = load_sequences(f"{tmp_path / 'b'},{tmp_path / 'a'}", max_length=4)
    assert [s.id for s in reordered] == ["b0", "a0", "a1"] and reordered[2].tokens == [1, 2, 5, 6]
    with pytest.raises(TreeFlashError, match="'a1' is in both"):
        load_sequences(f"{tmp_path / 'a'},{tmp_path / 'c'}")
    shard("d", [("d0", [3, 4]), ("d0", [5, 6])])  # one data set that repeats an id: named as such, not as "both"
    with pytest.raises(TreeFlashError, match="'d0' appears twice in .*d; record ids must be unique"):
        load_sequences(f"{tmp_path / 'a'},{tmp_path / 'd'}")
    with pytest.raises(TreeFlashError, match="'d0' appears twice in"):
        load_sequences(tmp_path / "d")
    with pytest.raises(TreeFlashError, match="empty name"):
        load_sequences(f"{tmp_path / 'a'},")
    with pytest.raises(TreeFlashError, match="no training data"):
        load_sequences(f"{tmp_path / 'a'},{tmp_path / 'missing'}")


def test_bad_inputs_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(TreeFlashError, match="no training data"):
        load_sequences(tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shard-00000.jsonl").write_text('{"prompt": "hello"}\n')
    with pytest.raises(TreeFlashError, match="not a training record"):
        load_sequences(bad)
    with pytest.raises(TreeFlashError, match="unknown training stage"):
        TrainConfig(stage="everything")

    target = tiny_target("llama", dtype=torch.float32)
    other = tiny_target("llama", dtype=torch.float32, vocab=50)
    with pytest.raises(TreeFlashError, match="vocabulary"):
        train(tiny_drafter(other, block_size=4).float(), target, _sequences(target), _config(), tmp_path / "x",
              progress=False, log=lambda m: None)

    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 1024))
    with pytest.raises(TreeFlashError, match="not enough disk space"):
        train(tiny_drafter(target, block_size=4).float(), target, _sequences(target), _config(epochs=1),
              tmp_path / "y", progress=False, log=lambda m: None)


def test_max_sequences_pins_the_data(tmp_path):
    target = tiny_target("llama", dtype=torch.float32)
    metrics = train(_fresh(target), target, _sequences(target, count=6), _config(epochs=1, max_sequences=4),
                    tmp_path / "run", progress=False, log=lambda m: None)
    assert metrics["total_steps"] == 2  # 4 sequences, 2 held out for validation
    # More data arriving later does not change the run: it resumes (here: is already complete).
    again = train(_fresh(target), target, _sequences(target, count=9), _config(epochs=1, max_sequences=4),
                  tmp_path / "run", progress=False, log=lambda m: None)
    assert again["step"] == 2


def test_held_out_files_pin_the_validation_records(tmp_path):
    target = tiny_target("llama", dtype=torch.float32)
    (tmp_path / "a.json").write_text(json.dumps(["s1"]))
    (tmp_path / "b.json").write_text(json.dumps(["s4"]))
    metrics = train(_fresh(target), target, _sequences(target, count=6),
                    _config(epochs=1, held_out=f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}"),
                    tmp_path / "run", progress=False, log=lambda m: None)
    assert json.loads((tmp_path / "run" / "held_out.json").read_text()) == ["s1", "s4"]
    assert metrics["total_steps"] == 4  # 6 sequences, the 2 named ones held out
    # The hashed split of the same data holds out other records, so the files decided.
    assert {s.id for s in split_validation(_sequences(target, count=6), 2)[0]} != {"s1", "s4"}


def test_held_out_files_must_match_the_data(tmp_path):
    target = tiny_target("llama", dtype=torch.float32)
    (tmp_path / "h.json").write_text(json.dumps(["s1", "elsewhere"]))
    with pytest.raises(TreeFlashError, match="1 of the 2 held-out records .*elsewhere.* are not in this data"):
        train(_fresh(target), target, _sequences(target, count=6), _config(held_out=str(tmp_path / "h.json")),
              tmp_path / "run", progress=False, log=lambda m: None)
    (tmp_path / "all.json").write_text(json.dumps([f"s{i}" for i in range(3)]))
    with pytest.raises(TreeFlashError, match="nothing to train on"):
        train(_fresh(target), target, _sequences(target, count=3), _config(held_out=str(tmp_path / "all.json")),
              tmp_path / "run2", progress=False, log=lambda m: None)
    (tmp_path / "bad.json").write_text('{"ids": 1}')
    with pytest.raises(TreeFlashError, match="not a list of record ids"):
        train(_fresh(target), target, _sequences(target, count=3), _config(held_out=str(tmp_path / "bad.json")),
              tmp_path / "run3", progress=False, log=lambda m: None)
    assert not any(tmp_path.glob("run*"))  # a refused run leaves nothing behind
    # Validating only needs no training records: the held-out data alone is enough.
    metrics = train(_fresh(target), target, _sequences(target, count=3), _config(held_out=str(tmp_path / "all.json")),
                    tmp_path / "validate", max_steps=0, progress=False, log=lambda m: None)
    assert metrics["step"] == 0 and 1.0 <= metrics["marginal_chain_tau"] <= 4.0  # block 4


def test_the_validation_split_is_stable_as_the_data_grows():
    def data(n):
        return [Sequence(f"conv-{i}", [1, 2, 3], 1) for i in range(n)]

    val, train_set = split_validation(data(200), 16, seed=0)
    assert len(val) == 16 and len(train_set) == 184
    assert {s.id for s in val}.isdisjoint(s.id for s in train_set)
    # Grown data: nothing trained on before becomes validation; the new validation set still has 16.
    grown_val, _ = split_validation(data(2000), 16, seed=0)
    assert len(grown_val) == 16
    assert not {s.id for s in grown_val} & {s.id for s in train_set}
    # Another seed holds out other sequences; all but one at most are held out.
    assert {s.id for s in split_validation(data(200), 16, seed=1)[0]} != {s.id for s in val}
    assert len(split_validation(data(3), 16)[0]) == 2


def test_the_held_out_records_do_not_move_with_the_seed(tmp_path):
    target = tiny_target("llama", dtype=torch.float32)
    held = []
    for seed in (0, 1):
        train(_fresh(target), target, _sequences(target, count=12), _config(epochs=1, seed=seed, val_sequences=3),
              tmp_path / f"seed{seed}", max_steps=1, progress=False, log=lambda m: None)
        held.append(json.loads((tmp_path / f"seed{seed}" / "held_out.json").read_text()))
    assert len(held[0]) == 3 and held[0] == held[1]
    ids = [s.id for s in _sequences(target, count=12)]
    assert held[0] == [s.id for s in split_validation(_sequences(target, count=12), 3)[0]] and set(held[0]) <= set(ids)


def test_initialize_from_target_copies_the_last_layers():
    from treeflash.train.surgery import initialize_from_target

    target = tiny_target("llama", dtype=torch.float32)
    drafter = _fresh(target)
    copied = initialize_from_target(drafter, target)
    assert torch.equal(drafter.layers[1].mlp.down_proj.weight, target.layers[5].mlp.down_proj.weight)
    assert torch.equal(drafter.layers[0].self_attn.q_proj.weight, target.layers[4].self_attn.q_proj.weight)
    assert "layers.0.self_attn.q_norm.weight" not in copied  # Llama has none: stays 1
    features = torch.randn(3, 3 * 32)
    torch.testing.assert_close(drafter.fc(features), features[:, 64:96])  # passes layer 4 (the deepest) through


def test_feature_scale_balances_the_inputs_and_folds_exactly(tmp_path):
    """fc trains behind per-feature powers of two that even out the target's feature magnitudes; putting fc
    behind them and taking it back out changes nothing, bit for bit, and checkpoints hold the folded weights."""
    from treeflash.drafters import load_drafter, save_drafter
    from treeflash.train.blocks import feature_scale, scale_features

    target = tiny_target("llama", dtype=torch.float32)
    drafter = _fresh(target)
    data = _sequences(target)
    scale = feature_scale(drafter, target, data)
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two
    features = torch.cat([target_pass(target, drafter, torch.tensor(s.tokens), False)[0][1:] for s in data])
    rms = (features * scale).pow(2).mean(0).sqrt()
    assert rms.min() > 0.7 and rms.max() < 1.42  # within a factor sqrt(2) of 1, whatever the raw spread
    x = features[:5]
    before, weight = drafter.fuse(x), drafter.fc.weight.clone()
    scale_features(drafter, scale)
    assert not torch.equal(drafter.fc.weight, weight)
    torch.testing.assert_close(drafter.fuse(x), before, atol=1e-6, rtol=1e-6)
    save_drafter(drafter, tmp_path / "d")
    assert torch.equal(load_drafter(tmp_path / "d", target).fc.weight, weight)
    scale_features(drafter, None)
    assert torch.equal(drafter.fc.weight, weight) and drafter.feature_scale is None


def test_training_hands_back_a_plain_drafter(tmp_path):
    """After training behind the feature scale, the drafter in memory and its checkpoint compute the same."""
    from treeflash.drafters import load_drafter

    target = tiny_target("llama", dtype=torch.float32)
    drafter = _fresh(target)
    train(drafter, target, _sequences(target), _config(epochs=1), tmp_path / "r", progress=False, log=lambda m: None)
    assert drafter.feature_scale is None
    saved = load_drafter(tmp_path / "r" / "drafter", target)
    assert torch.equal(saved.fc.weight, drafter.fc.weight)


def _anchor_walks(count: int, seed: int, symbols: int = 12, length: int = 40, jump: float = 0.3):
    """Synthetic data where a block's tokens depend on its anchor token and on the block offset: each response
    walks one fixed random cycle over `symbols` tokens, and jumps to a random symbol with probability `jump`
    at each step, so the context alone cannot tell the anchor. Best possible top-1 at block offset k:
    (1 - jump)^k plus a little (0.72 / 0.51 / 0.36 for k = 1 / 2 / 3); from the context alone about 0.5 at k = 1."""
    g = torch.Generator().manual_seed(100)  # the same cycle for every call
    alphabet = torch.randperm(90, generator=g)[:symbols]
    step = torch.randperm(symbols, generator=g)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt = torch.randint(0, 90, (4,), generator=g).tolist()
        x, walk = int(torch.randint(0, symbols, (1,), generator=g)), []
        for _ in range(length):
            walk.append(int(alphabet[x]))
            x = int(torch.randint(0, symbols, (1,), generator=g)) if torch.rand(1, generator=g) < jump else int(step[x])
        out.append(Sequence(f"walk{seed}-{i}", prompt + walk, prompt_length=4))
    return out


def test_the_default_recipe_learns_to_read_the_anchor(tmp_path):
    """What the shipped drafter failed at: on data where each block is a function of its anchor and offset, a
    short run of the default recipe must get close to the best possible accuracy on new sequences, with a
    profile that decays like the data's, and changing the anchor must change its prediction."""
    from treeflash.drafters import new_drafter
    from treeflash.train.features import build_feature_cache
    from treeflash.train.config import DEFAULT_LAYERS
    from treeflash.train.validation import evaluate

    target = tiny_target("llama", dtype=torch.float32)
    build_feature_cache(target, _anchor_walks(160, seed=0), tmp_path / "cache", layers=(1, 2, 4), progress=False)
    drafter = new_drafter(target, num_hidden_layers=DEFAULT_LAYERS, block_size=4, target_layer_ids=(1, 2, 4),
                          mask_token_id=target.vocab_size - 1).float()
    # The default recipe (init, loss, weights, batch, anchors), with a learning rate for a 32-wide model.
    config = TrainConfig(features=str(tmp_path / "cache"), lr=3e-3, epochs=30, val_sequences=8, eval_every=10**6)
    before = evaluate(drafter, target, _anchor_walks(8, seed=1), config, reference="labels")
    train(drafter, target, None, config, tmp_path / "run", progress=False, log=lambda m: None, fresh_fc=True)
    after = evaluate(drafter, target, _anchor_walks(8, seed=1), config, reference="labels")
    top1 = after["marginal_top1"]
    assert top1[0] > 0.62 and top1[0] > top1[1] > top1[2] > 0.2, top1  # best possible: .72 / .51 / .36
    assert after["anchor_sensitivity"] > 1.0 and before["anchor_sensitivity"] < 0.1, (before, after)


def test_a_padded_batch_equals_each_sequence_alone():
    """Sequences of different lengths and anchor counts in one padded pass give what each gives alone."""
    from treeflash.train.blocks import Example, batch_hidden

    target = tiny_target("qwen3")
    drafter = tiny_drafter(target, block_size=4)
    g = torch.Generator().manual_seed(3)
    examples = []
    for length, anchors in ((30, [3, 9, 20]), (12, [5]), (21, [2, 4, 6, 8, 15])):
        tokens = torch.randint(0, target.vocab_size, (length,), generator=g)
        anchors = torch.tensor(anchors)
        features, _ = target_pass(target, drafter, tokens, logits=False)
        examples.append(Example(tokens, features, torch.zeros(0), anchors, make_blocks(tokens, anchors, 4, 96)))
    with torch.no_grad():
        together = batch_hidden(drafter, target, examples)
        for e, h in zip(examples, together):
            torch.testing.assert_close(h, batch_hidden(drafter, target, [e])[0], atol=1e-10, rtol=1e-10)


def test_a_time_budget_sets_the_schedule_and_ends_the_run(tmp_path):
    target = tiny_target("llama", dtype=torch.float32)
    metrics = train(_fresh(target), target, _sequences(target), _config(epochs=1000, time_budget=0.02),
                    tmp_path / "run", progress=False, log=lambda m: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert metrics["complete"] and 1 < len(log) < 1000 * 4
    assert log[-1]["seconds"] >= 1.2 and "anchor_sensitivity" in log[-1]  # validated at the end
    assert max(r["lr"] for r in log) > 10 * log[-1]["lr"]  # warmed up, then decayed by the clock
    with pytest.raises(TreeFlashError, match="time budget"):
        _config(time_budget=0)


def test_target_labels_teach_the_target_on_text_it_did_not_write(tmp_path):
    """On random text (not the target's), cross-entropy on the text's own tokens teaches the text; with
    labels="target" the same run learns the target's greedy tokens at those positions instead, which is what
    verification accepts."""
    from treeflash.train.validation import evaluate

    target = tiny_target("llama", dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    data = [Sequence(f"r{i}", torch.randint(0, target.vocab_size - 1, (24,), generator=g).tolist(), prompt_length=4)
            for i in range(3)]
    first_position = {}
    for labels in ("data", "target"):
        drafter = _fresh(target)
        config = _config(labels=labels, epochs=60, val_sequences=1)
        train(drafter, target, data, config, tmp_path / labels, progress=False, log=lambda m: None)
        trained_on = split_validation(data, config.val_sequences)[1]  # memorised: the clearest signal
        first_position[labels] = {ref: evaluate(drafter, target, trained_on, config, reference=ref)["marginal_top1"][0]
                                  for ref in ("target", "labels")}
    # Each run agrees with what it was taught far more than with the other.
    assert first_position["target"]["target"] > first_position["data"]["target"] + 0.3
    assert first_position["data"]["labels"] > first_position["target"]["labels"] + 0.3
    with pytest.raises(TreeFlashError, match="unknown labels"):
        TrainConfig(labels="targets")


def test_a_small_data_set_is_not_mostly_spent_on_validation(tmp_path):
    """By default at most a tenth of the data is held out (32 at most, one at least), and the run says so; an
    explicit count is kept."""
    assert [validation_count(n, None) for n in (2, 38, 100, 320, 5000)] == [1, 3, 10, 32, 32]
    assert validation_count(38, 20) == 20
    target = tiny_target("llama", dtype=torch.float32)
    messages = []
    metrics = train(_fresh(target), target, _sequences(target, count=20), _config(epochs=1, val_sequences=None),
                    tmp_path / "run", progress=False, log=messages.append)
    assert len(json.loads((tmp_path / "run" / "held_out.json").read_text())) == 2
    assert metrics["total_steps"] == 18 // _config().batch_size + (18 % _config().batch_size > 0)
    assert any("validating on 2 of the 20 sequences" in m and "a tenth" in m for m in messages)
