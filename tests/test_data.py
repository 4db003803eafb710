"""Prompt sources (ShareGPT's later turns, with the held-out split kept out whole) and regeneration."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

import treeflash.train.prompts as data
from treeflash.errors import TreeFlashError
from treeflash.train.prompts import EVAL_SETS, Prompt, sharegpt_later_turns, sharegpt_replies
from treeflash.train.records import load_sequences, read_shard_lines, write_shard_lines, write_shards
from treeflash.train.regenerate import dataset_responses

from helpers import needs_eval_sets
from test_cli import model_dir  # noqa: F401  (the tiny Llama saved to disk with a word-level tokenizer)


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


def test_replies_are_every_answered_turn_of_the_training_split(monkeypatch):
    monkeypatch.setattr(data, "SHAREGPT_HELDOUT", 1)
    records = [
        _record("a", "q1", "r1", "q2", "r2", "q3"),  # q3 has no answer: not a reply record
        _record("c", "q1", "r1", "", "r2"),
        _record("e", "held", "out", "q2", "r2"),  # held out whole
    ]
    prompts = sharegpt_replies(iter(records))
    assert [(p.id, p.text, p.reply) for p in prompts] == [
        ("sharegpt-a-reply1", "q1", "r1"), ("sharegpt-a-reply2", "q2", "r2"), ("sharegpt-c-reply1", "q1", "r1")]
    assert prompts[1].history == (("user", "q1"), ("assistant", "r1"))


def test_python_functions_are_signatures_and_docstrings_without_bodies(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "tools.py").write_text(
        'import os\n\n'
        '@decorator\n'
        'def add(a: int, b: int = 2) -> int:\n'
        '    """Add two numbers, b defaulting to two.\n\n    >>> add(1)\n    3\n    """\n'
        '    return a + b\n\n'
        'def _private(x):\n    """A private helper, left out of the prompts."""\n    return x\n\n'
        'def short(x):\n    """Too short."""\n    return x\n\n'
        'def undocumented(x):\n    return x\n\n'
        'class Stack:\n'
        '    """A stack."""\n'
        '    def push(self, item):\n        "Put an item on top of the stack."\n        self.items.append(item)\n'
        '    def _grow(self):\n        """A private method, left out of the prompts."""\n'
        'class Box:\n'
        '    @property\n    def size(self):\n        """The size of the box, in litres."""\n'
        '    @size.setter\n    def size(self, value):\n        """Set the size of the box, in litres."""\n')
    (tmp_path / "pkg" / "broken.py").write_text("def oops(:\n")  # does not parse: skipped
    (tmp_path / "tests").mkdir()  # a test directory: skipped
    (tmp_path / "tests" / "helpers.py").write_text('def check(x):\n    """A test helper that is not a prompt."""\n')
    prompts = {p.id: p.text for p in data.load_prompts(f"python-functions:{tmp_path}")}
    assert prompts == {
        "pyfunc-pkg.tools.add": 'def add(a: int, b: int = 2) -> int:\n    """Add two numbers, b defaulting to two.\n\n'
                                '    >>> add(1)\n    3\n    """\n',
        "pyfunc-pkg.tools.Stack.push": 'class Stack:\n    def push(self, item):\n'
                                       '        "Put an item on top of the stack."\n',
        # a property's getter and setter: two prompts, so two ids (record ids must be unique in a data set)
        "pyfunc-pkg.tools.Box.size": 'class Box:\n    def size(self):\n        """The size of the box, in litres."""\n',
        "pyfunc-pkg.tools.Box.size-2": 'class Box:\n    def size(self, value):\n'
                                       '        """Set the size of the box, in litres."""\n',
    }
    with pytest.raises(TreeFlashError, match="is not one; pass python-functions:DIR"):
        data.load_prompts(f"python-functions:{tmp_path / 'missing'}")


def test_python_functions_read_the_standard_library_in_a_fixed_order():
    prompts = data.load_prompts("python-functions")
    assert len(prompts) > 3000 and len({p.text for p in prompts}) == len(prompts) == len({p.id for p in prompts})
    assert not any(".test." in p.id or p.id.startswith("pyfunc-test.") for p in prompts)
    assert len({p.id.split(".")[0] for p in prompts[:20]}) > 5  # shuffled: a spread of modules
    # --limit takes the first prompts of that order (on one package of the library: reading all of it takes seconds)
    email = Path(sysconfig.get_paths()["stdlib"]) / "email"
    some = data.load_prompts(f"python-functions:{email}")
    assert len(some) > 20 and [p.id for p in data.load_prompts(f"python-functions:{email}", limit=20)] == [
        p.id for p in some[:20]]


@needs_eval_sets
def test_dataset_responses_write_the_replies_as_records(model_dir, tmp_path, capsys):  # noqa: F811
    """The dataset's own replies, tokenised, end-of-turn appended, cut at the cap; resumable like regeneration;
    a prompt without a reply is a clear error. Then through the CLI."""
    from transformers import AutoTokenizer

    from treeflash.cli import main
    from treeflash.train.records import load_sequences

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [Prompt("x-reply1", "w3 w4", reply="w5 w6 w7"), Prompt("y-reply1", "w8", reply="w9 w10 w11 w12 w13 w14")]
    counts = dataset_responses(tokenizer, prompts, tmp_path / "d", eos_token_id=2, max_new_tokens=4, progress=False)
    assert counts["written_now"] == 2
    records = [json.loads(line) for line in read_shard_lines(tmp_path / "d" / "shard-00000.jsonl.gz")]
    words = tokenizer.encode("w5 w6 w7", add_special_tokens=False)
    assert records[0]["response_ids"] == (words + [2])[:4] and len(records[1]["response_ids"]) == 4
    assert records[0]["prompt_ids"] == tokenizer.apply_chat_template(prompts[0].messages(), add_generation_prompt=True,
                                                                      return_dict=False)
    assert len(load_sequences(tmp_path / "d")) == 2
    again = dataset_responses(tokenizer, prompts, tmp_path / "d", eos_token_id=2, max_new_tokens=4, progress=False)
    assert again["written_now"] == 0
    with pytest.raises(TreeFlashError, match="no reply of their own"):
        dataset_responses(tokenizer, [Prompt("z", "w3")], tmp_path / "e", eos_token_id=2)
    # The CLI: a JSONL source keeps no replies, so --responses dataset refuses it; --server makes no sense with it.
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"prompt": "w3 w4"}) + "\n")
    base = ["train", "data", "--prompts", str(source), "--target", str(model_dir), "--responses", "dataset"]
    assert main(base + ["--out", str(tmp_path / "f")]) == 2
    assert "sharegpt-replies" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "g"), "--server", "http://localhost:1"]) == 2
    assert "drop --server" in capsys.readouterr().err


@pytest.mark.parametrize("name", EVAL_SETS)
def test_train_data_refuses_an_evaluation_set_before_writing_anything(name, tmp_path, capsys):
    from treeflash.cli import main

    assert main(["train", "data", "--prompts", name, "--out", str(tmp_path / "d")]) == 2
    assert f"{name} is an evaluation set" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_regeneration_templates_the_whole_conversation(tmp_path):
    seen = []

    class Tokenizer:
        def apply_chat_template(self, messages, add_generation_prompt, return_dict):
            seen.append(messages)
            return list(range(len(messages)))

    prompt = Prompt("x-turn2", "q2", (("user", "q1"), ("assistant", "r1")))
    meta = {"batch_size": 2, "max_prompt_tokens": 8}
    write_shards(Tokenizer(), [prompt, Prompt("y", "q")], tmp_path, meta, lambda i, b: [[7] for _ in b], False)
    assert seen[0] == prompt.messages() and seen[1] == [{"role": "user", "content": "q"}]
    lines = [json.loads(line) for line in read_shard_lines(tmp_path / "shard-00000.jsonl.gz")]
    assert [(r["id"], r["prompt_ids"]) for r in lines] == [("x-turn2", [0, 1, 2]), ("y", [0])]


# -- regeneration engines ---------------------------------------------------------------------------


def _tiny_model_and_tokenizer(model_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def test_regeneration_through_our_engine_writes_what_transformers_generate_writes(model_dir, tmp_path):  # noqa: F811
    """At T = 0 the engines give the same records (float64: no near-ties), shard for shard, prompts of unequal
    lengths batched together and responses stopping at EOS or at the cap; each response is `ar`'s alone."""
    from treeflash.train.records import load_sequences
    from treeflash.train.regenerate import regenerate
    from treeflash.decoding import DecodeConfig, Decoder
    from treeflash.targets import Target

    model, tokenizer = _tiny_model_and_tokenizer(model_dir)
    prompts = [Prompt(f"p{i}", " ".join(f"w{(7 * i + 3 * j) % 90 + 3}" for j in range(1 + i % 4))) for i in range(7)]
    ours = regenerate(model, tokenizer, prompts, tmp_path / "ours", max_new_tokens=12, batch_size=3, progress=False)
    theirs = regenerate(model, tokenizer, prompts, tmp_path / "theirs", max_new_tokens=12, batch_size=3,
                        progress=False, engine="transformers")
    assert ours["shards"] == theirs["shards"] == 3 and ours["written_now"] == 7
    # A loaded Target (what the CLI passes: no second packed copy of the weights) gives the same shards.
    regenerate(Target(model, tokenizer), tokenizer, prompts, tmp_path / "target", max_new_tokens=12, batch_size=3,
               progress=False)
    for name in ("shard-00000.jsonl.gz", "shard-00001.jsonl.gz", "shard-00002.jsonl.gz"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes()
        assert (tmp_path / "target" / name).read_bytes() == (tmp_path / "ours" / name).read_bytes()
    records = [json.loads(line) for line in read_shard_lines(tmp_path / "ours" / "shard-00001.jsonl.gz")]
    alone = Decoder(Target(model, tokenizer)).generate(records[0]["prompt_ids"],
                                                       DecodeConfig(method="ar", max_new_tokens=12))
    assert records[0]["response_ids"] == alone.token_ids
    lengths = [len(s.tokens) - s.prompt_length for s in load_sequences(tmp_path / "ours")]
    assert max(lengths) == 12  # some responses reach the cap (the tiny model rarely says EOS)
    assert json.loads((tmp_path / "ours" / "regenerate.json").read_text())["engine"] == "treeflash"


def test_a_data_directory_keeps_the_engine_it_was_made_with(model_dir, tmp_path):  # noqa: F811
    from treeflash.train.regenerate import regenerate

    model, tokenizer = _tiny_model_and_tokenizer(model_dir)
    prompts = [Prompt(f"p{i}", f"w{i + 3} w{i + 9}") for i in range(4)]
    out = tmp_path / "data"
    regenerate(model, tokenizer, prompts[:2], out, max_new_tokens=4, batch_size=2, progress=False)
    with pytest.raises(TreeFlashError, match="holds data made with other settings.*same settings to continue it"):
        regenerate(model, tokenizer, prompts, out, max_new_tokens=4, batch_size=2, progress=False,
                   engine="transformers")
    assert regenerate(model, tokenizer, prompts, out, max_new_tokens=4, batch_size=2, progress=False)["written_now"] == 2
    # Data made before the engine was recorded was made by transformers, and continues with it.
    meta = json.loads((out / "regenerate.json").read_text())
    del meta["engine"]
    (out / "regenerate.json").write_text(json.dumps(meta))
    with pytest.raises(TreeFlashError, match="other settings"):
        regenerate(model, tokenizer, prompts, out, max_new_tokens=4, batch_size=2, progress=False)
    regenerate(model, tokenizer, prompts, out, max_new_tokens=4, batch_size=2, progress=False, engine="transformers")
    with pytest.raises(TreeFlashError, match="unknown engine 'vllm'; choose one of treeflash, transformers"):
        regenerate(model, tokenizer, prompts, out, engine="vllm")


@needs_eval_sets
def test_train_data_cli_regenerates_through_our_engine_by_default(model_dir, tmp_path, capsys):  # noqa: F811
    from treeflash.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"w{i + 3} w{2 * i + 5}"}) + "\n" for i in range(3)))
    out = tmp_path / "data"
    argv = ["train", "data", "--prompts", str(prompts), "--target", str(model_dir), "--out", str(out),
            "--max-new-tokens", "5", "--batch-size", "2"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["written_now"] == 3
    assert json.loads((out / "regenerate.json").read_text())["engine"] == "treeflash"
    assert main(argv + ["--engine", "transformers"]) == 2
    assert "holds data made with other settings" in capsys.readouterr().err


@needs_eval_sets
def test_train_data_interrupted_says_so_in_one_line_and_resumes(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    import treeflash.train.records
    from treeflash.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"w{i + 3} w{2 * i + 5}"}) + "\n" for i in range(3)))
    out = tmp_path / "data"
    argv = ["train", "data", "--prompts", str(prompts), "--target", str(model_dir), "--out", str(out),
            "--max-new-tokens", "5", "--batch-size", "2"]
    shard_path = treeflash.train.records._shard_path

    def ctrl_c_before_the_second_shard(out_dir, index):
        if index == 1:
            raise KeyboardInterrupt
        return shard_path(out_dir, index)

    monkeypatch.setattr(treeflash.train.records, "_shard_path", ctrl_c_before_the_second_shard)
    try:
        assert main(argv) == 130
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped `treeflash train data` as a traceback")
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "treeflash: interrupted; the same command resumes from what was written"
    assert "Traceback" not in err
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.jsonl.gz"]  # whole, and nothing half-written
    monkeypatch.setattr(treeflash.train.records, "_shard_path", shard_path)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["written_now"] == 1  # only the shard the interrupt cut off


def test_compressed_and_plain_shards_load_the_same(tmp_path):
    records = [json.dumps({"id": f"r{i}", "prompt_ids": [1, 2, i], "response_ids": list(range(i + 2))})
               for i in range(5)]
    for name, suffix in (("plain", ".jsonl"), ("gz", ".jsonl.gz"), ("mixed", None)):
        (tmp_path / name).mkdir()
        write_shard_lines(tmp_path / name / f"shard-00000{suffix or '.jsonl'}", records[:3])
        write_shard_lines(tmp_path / name / f"shard-00001{suffix or '.jsonl.gz'}", records[3:])
    assert (tmp_path / "gz" / "shard-00000.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"  # really gzip
    loaded = {name: load_sequences(tmp_path / name) for name in ("plain", "gz", "mixed")}
    assert loaded["plain"] == loaded["gz"] == loaded["mixed"] and [s.id for s in loaded["gz"]] == [f"r{i}" for i in range(5)]
    assert read_shard_lines(tmp_path / "gz" / "shard-00001.jsonl.gz") == records[3:]
    # Written reproducibly: the same records give the same bytes (no timestamp in the gzip header).
    write_shard_lines(tmp_path / "again.jsonl.gz", records[:3])
    assert (tmp_path / "again.jsonl.gz").read_bytes() == (tmp_path / "gz" / "shard-00000.jsonl.gz").read_bytes()
