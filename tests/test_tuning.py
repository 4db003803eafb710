"""`treeflash tune`: timed settings, the choice of the fastest, and tuned defaults that only apply where valid."""

import json

import pytest
import torch

from treeflash.decoding import (DEFAULT_BUDGET, DEFAULT_CPU_BUDGET, DEFAULT_LOOKUP, DecodeConfig, Decoder,
                                resolve_budget, resolve_lookup)
from treeflash.errors import TreeFlashError
from treeflash.tuning import Tuning, load_tuning, report, save_tuning, tune, tuning_path

from helpers import tiny_drafter, tiny_target

PROMPT = [5, 17, 33, 2, 71, 8, 40]


@pytest.fixture(scope="module")
def tuned():
    target = tiny_target("llama")
    decoder = Decoder(target, tiny_drafter(target))
    return decoder, tune(decoder, [PROMPT, PROMPT[:4]], budgets=(2, 6), candidates=(2, 4), lookups=(0, 3),
                         max_new_tokens=12)


def test_tune_times_every_setting_and_picks_the_fastest(tuned):
    _, tuning = tuned
    timed = {(s.method, s.budget, s.candidate_tokens, s.lookup) for s in tuning.settings}
    tree_lookup = DEFAULT_LOOKUP["treeflash"]  # budgets and m are timed with the default lookup
    assert {("ddtree", 2, None, tree_lookup), ("ddtree", 6, None, tree_lookup), ("treeflash", 2, 16, tree_lookup),
            ("treeflash", 6, 16, tree_lookup), ("ar", 0, None, 0)} <= timed
    assert [s.lookup for s in tuning.settings if s.method == "dflash"] == [0]
    best_tf = tuning.best["treeflash"]
    assert {("treeflash", best_tf["budget"], m, tree_lookup) for m in (2, 4)} <= timed  # m tried at the best budget
    for method in ("ddtree", "treeflash"):  # then each lookup at the best budget and m
        rows = [s for s in tuning.settings if s.method == method and s.lookup in (0, 3)]
        assert sorted(s.lookup for s in rows) == [0, 3]
        assert tuning.best[method]["lookup"] in (0, 3, tree_lookup)
    assert "lookup" not in tuning.best["ar"] and "lookup" not in tuning.best["dflash"]
    for method, best in tuning.best.items():
        rows = [s for s in tuning.settings if s.method == method]
        assert best["tokens_per_second"] == max(s.tokens_per_second for s in rows)
    assert tuning.best[tuning.fastest_method]["tokens_per_second"] == max(
        b["tokens_per_second"] for b in tuning.best.values())
    assert all(s.new_tokens == 24 for s in tuning.settings)  # 2 prompts x 12 tokens, no EOS in a tiny model
    assert "**yes**" in report(tuning)


def test_a_decoder_uses_its_tuning_when_the_config_leaves_budget_and_m_unset(tuned):
    decoder, tuning = tuned
    tuning = Tuning(key=tuning.key, best={"treeflash": {"budget": 3, "candidate_tokens": 2, "tokens_per_second": 1}},
                    settings=[], fastest_method="treeflash")
    with_tuning = Decoder(decoder.target, decoder.drafter, tuning=tuning)
    result = with_tuning.generate(PROMPT, DecodeConfig(method="treeflash", max_new_tokens=10))
    explicit = decoder.generate(PROMPT, DecodeConfig(method="treeflash", budget=3, candidate_tokens=2,
                                                     max_new_tokens=10))
    assert result.budget == 3
    assert result.acceptance_lengths == explicit.acceptance_lengths and result.token_ids == explicit.token_ids
    assert with_tuning.generate(PROMPT, DecodeConfig(method="treeflash", budget=5, max_new_tokens=4)).budget == 5
    # A method the tuning says nothing about falls back to the device default.
    assert with_tuning.generate(PROMPT, DecodeConfig(method="ddtree", max_new_tokens=4)).budget == DEFAULT_CPU_BUDGET


def test_a_decoder_uses_its_tuned_lookup_unless_the_config_sets_one(tuned):
    decoder, tuning = tuned
    tuning = Tuning(key=tuning.key, best={"treeflash": {"budget": 3, "candidate_tokens": 2, "lookup": 0,
                                                        "tokens_per_second": 1}},
                    settings=[], fastest_method="treeflash")
    with_tuning = Decoder(decoder.target, decoder.drafter, tuning=tuning)
    assert with_tuning.generate(PROMPT, DecodeConfig(method="treeflash", max_new_tokens=6)).lookup == 0
    assert with_tuning.generate(PROMPT, DecodeConfig(method="treeflash", max_new_tokens=6, lookup=4)).lookup == 4
    # A method the tuning has no lookup for (a tuning saved before lookups were tuned) keeps the default.
    assert with_tuning.generate(PROMPT, DecodeConfig(method="ddtree", max_new_tokens=6)).lookup == DEFAULT_LOOKUP["ddtree"]
    assert resolve_lookup("treeflash", None, tuning) == 0 and resolve_lookup("dflash", None, tuning) == 0
    assert resolve_lookup("treeflash", None) == DEFAULT_LOOKUP["treeflash"]


def test_untuned_default_budget_depends_on_the_device():
    assert resolve_budget("ddtree", None, None, device="cpu") == DEFAULT_CPU_BUDGET
    assert resolve_budget("treeflash", None, None, device="cuda") == DEFAULT_BUDGET
    assert resolve_budget("ar", 12, None) == 0


def test_saved_tuning_loads_for_the_same_setup_only(tuned, tmp_path, monkeypatch):
    decoder, tuning = tuned
    monkeypatch.setenv("TREEFLASH_CACHE", str(tmp_path))
    assert load_tuning(decoder) is None
    path = save_tuning(tuning)
    assert path == tuning_path(tuning.key) and path.is_relative_to(tmp_path)
    loaded = load_tuning(decoder)
    assert loaded.best == tuning.best and loaded.fastest_method == tuning.fastest_method
    assert [s.tau for s in loaded.settings] == [s.tau for s in tuning.settings]
    other = Decoder(decoder.target, tiny_drafter(decoder.target, seed=9))  # another drafter: another key
    assert load_tuning(other) is None
    torch.set_num_threads(2)  # another thread count: another key
    try:
        assert load_tuning(decoder) is None
    finally:
        torch.set_num_threads(1)


def test_an_unreadable_tuning_is_ignored_with_a_message(tuned, tmp_path, monkeypatch, capsys):
    decoder, tuning = tuned
    monkeypatch.setenv("TREEFLASH_CACHE", str(tmp_path))
    save_tuning(tuning).write_text("{not json")
    assert load_tuning(decoder) is None
    assert "treeflash tune" in capsys.readouterr().err


def test_bad_tuning_requests_are_clear_errors(tuned):
    decoder, _ = tuned
    with pytest.raises(TreeFlashError, match="needs a drafter"):
        tune(Decoder(decoder.target), [PROMPT])
    with pytest.raises(TreeFlashError, match="at least one prompt"):
        tune(decoder, [])
    with pytest.raises(TreeFlashError, match="budget"):
        tune(decoder, [PROMPT], budgets=(0,))
    with pytest.raises(TreeFlashError, match="candidate"):
        tune(decoder, [PROMPT], candidates=(0,))
    with pytest.raises(TreeFlashError, match="repeats"):
        tune(decoder, [PROMPT], repeats=0)
    with pytest.raises(TreeFlashError, match="lookup lengths"):
        tune(decoder, [PROMPT], lookups=(-1,))


def test_tuning_json_round_trip(tuned):
    _, tuning = tuned
    again = Tuning.from_json(json.loads(json.dumps(tuning.to_json())))
    assert again.best == tuning.best and len(again.settings) == len(tuning.settings)
    assert [s.lookup for s in again.settings] == [s.lookup for s in tuning.settings]
    # A tuning saved before lookups were tuned (settings without "lookup") still loads, as lookup off.
    old = tuning.to_json()
    for row in old["settings"]:
        row.pop("lookup")
    assert all(s.lookup == 0 for s in Tuning.from_json(old).settings)
