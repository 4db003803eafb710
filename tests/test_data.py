"""Prompt sources: ShareGPT's later turns, with the held-out split kept out whole."""

import json

import treeflash.data as data
from treeflash.data import Prompt, _write_shards, sharegpt_later_turns


def _record(cid, *texts, first="human"):
    roles = [first, "gpt"] if first == "human" else [first, "human"]
    return {"id": cid, "conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(texts)]}


def test_later_turns_come_with_the_conversation_so_far(monkeypatch):
    monkeypatch.setattr(data, "SHAREGPT_HELDOUT", 1)
    records = [
        _record("a", "q1", "r1", "q2", "r2", "q3", "r3"),
        _record("b", "only", "one"),  # no later turn
        _record("c", "q1", "r1", "", "r2", "q3"),  # ends at the empty turn: nothing after it counts
        {"id": "d", "conversations": [{"from": "human", "value": "q1"}, {"from": "human", "value": "q2"}]},  # not alternating
        _record("e", "held", "out", "q2", "r2"),  # the held-out conversation (the last with a first turn)
    ]
    prompts = sharegpt_later_turns(iter(records))
    assert [p.id for p in prompts] == ["sharegpt-a-turn2", "sharegpt-a-turn3"]
    assert prompts[0].text == "q2" and prompts[0].history == (("user", "q1"), ("assistant", "r1"))
    assert prompts[1].messages() == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"},
                                     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "r2"},
                                     {"role": "user", "content": "q3"}]


def test_the_held_out_split_is_the_same_as_for_first_turns(monkeypatch):
    """A record without a usable first turn does not shift the split: the held-out conversations are the
    ones whose first turns `sharegpt-heldout` holds, and records after them are left out too."""
    monkeypatch.setattr(data, "SHAREGPT_HELDOUT", 1)
    records = [_record("a", "q1", "r1", "q2"), _record("b", "q1", "r1", "q2"),
               {"id": "c", "conversations": []}]  # no first turn: the held-out one is b
    assert [p.id for p in sharegpt_later_turns(iter(records))] == ["sharegpt-a-turn2"]


def test_regeneration_templates_the_whole_conversation(tmp_path):
    seen = []

    class Tokenizer:
        def apply_chat_template(self, messages, add_generation_prompt, return_dict):
            seen.append(messages)
            return list(range(len(messages)))

    prompt = Prompt("x-turn2", "q2", (("user", "q1"), ("assistant", "r1")))
    meta = {"batch_size": 2, "max_prompt_tokens": 8}
    _write_shards(Tokenizer(), [prompt, Prompt("y", "q")], tmp_path, meta, lambda i, b: [[7] for _ in b], False)
    assert seen[0] == prompt.messages() and seen[1] == [{"role": "user", "content": "q"}]
    lines = [json.loads(line) for line in (tmp_path / "shard-00000.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prompt_ids"]) for r in lines] == [("x-turn2", [0, 1, 2]), ("y", [0])]
