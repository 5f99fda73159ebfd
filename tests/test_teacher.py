"""Teacher stage end to end on a tiny random Llama through a real local Ray: shard contents against
direct HF calls, resume after damage, refusal to mix runs, per-prompt seeded sampling."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.config import DataConfig, ModelConfig, PromptSource, TeacherConfig
from pipeline.shards import read_shard
from pipeline.teacher import (JOURNAL, SHARDS, cut_response, generate_responses, load_manifest, read_journal,
                              run_teacher, verify_shards)

PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push(self, x):\n", "for i in range(10):\n",
           "The quick brown fox", "def fibonacci(n):\n    if n < 2:\n", "print(i * i)\n"]
TEACHER = TeacherConfig(num_actors=2, batch_size=2, max_new_tokens=12, top_k=5, shard_size=2)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def cfgs(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return ModelConfig(base_model=str(tiny_model_dir)), DataConfig(train=PromptSource(path=str(path)))


@pytest.fixture(scope="module")
def teacher_dir(ray_local, cfgs, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("teacher")
    run_teacher(*cfgs, TEACHER, out_dir, progress=False)
    return out_dir


def shards_of(out_dir):
    m = load_manifest(out_dir)
    return {s["name"]: read_shard(out_dir / SHARDS / s["name"], m["hidden_size"], m["top_k"], m["hidden_dtype"])
            for s in m["shards"]}


def test_manifest_and_shard_shapes(teacher_dir, model):
    m = load_manifest(teacher_dir)
    assert [s["name"] for s in m["shards"]] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert (m["hidden_size"], m["vocab_size"], m["top_k"]) == (model.config.hidden_size, model.config.vocab_size, 5)
    assert m["num_sequences"] == 6 and verify_shards(teacher_dir) == []
    seqs = [s for shard in shards_of(teacher_dir).values() for s in shard]
    assert [s.prompt_id for s in seqs] == [str(i) for i in range(6)]  # shard i holds prompts [2i, 2i+2)
    assert m["num_tokens"] == sum(len(s.tokens) - 1 for s in seqs) == sum(s["tokens"] for s in m["shards"])
    for s in seqs:
        n = len(s.tokens)
        assert s.hidden.shape == (n, m["hidden_size"]) and s.hidden.dtype == np.float16
        assert s.topk_ids.shape == s.topk_logprobs.shape == (n, 5) and s.tail_logprob.shape == (n,)


def test_shards_match_direct_hf_calls(teacher_dir, model, cfgs):
    from data.prompts import load_prompts
    from pipeline.base_model import load_tokenizer

    prompts = {p.id: p.input_ids for p in load_prompts(cfgs[1].train, load_tokenizer(cfgs[0]), 512, "auto")}
    eos = model.config.eos_token_id
    for seq in (s for shard in shards_of(teacher_dir).values() for s in shard):
        prompt = torch.tensor([prompts[seq.prompt_id]])
        assert seq.prompt_len == prompt.shape[1] and seq.tokens[0] == prompt[0, -1]
        greedy = model.generate(prompt, max_new_tokens=TEACHER.max_new_tokens, do_sample=False)[0, prompt.shape[1]:]
        assert seq.tokens[1:].tolist() == greedy.tolist()
        assert eos not in seq.tokens[1:-1].tolist()  # a response stops at its first EOS
        full = torch.tensor([seq.tokens.tolist()[1:]]).long()
        with torch.no_grad():
            hidden = model.model(torch.cat([prompt, full], 1)).last_hidden_state[0, prompt.shape[1] - 1:]
            logprobs = torch.log_softmax(model.lm_head(hidden), -1)
        torch.testing.assert_close(torch.from_numpy(seq.hidden.astype(np.float32)), hidden, atol=5e-3, rtol=2e-3)
        top = logprobs.topk(5, -1)
        assert np.all(np.diff(seq.topk_logprobs, axis=-1) <= 0)  # sorted, best first
        np.testing.assert_array_equal(seq.topk_ids, top.indices.numpy())
        np.testing.assert_allclose(seq.topk_logprobs, top.values.numpy(), atol=1e-4)
        # the top-k mass plus the tail mass is the whole distribution
        total = np.logaddexp(np.logaddexp.reduce(seq.topk_logprobs, axis=-1), seq.tail_logprob)
        np.testing.assert_allclose(total, 0.0, atol=1e-5)


def test_finished_stage_returns_manifest_without_work(teacher_dir, cfgs):
    mtimes = {p.name: p.stat().st_mtime_ns for p in (teacher_dir / SHARDS).iterdir()}
    journal = (teacher_dir / JOURNAL).read_text()
    again = run_teacher(*cfgs, dataclasses.replace(TEACHER, num_actors=1, batch_size=3), teacher_dir, progress=False)
    assert again == load_manifest(teacher_dir)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (teacher_dir / SHARDS).iterdir()}
    assert (teacher_dir / JOURNAL).read_text() == journal


def test_resume_regenerates_only_damaged_shards(teacher_dir, cfgs, tmp_path):
    out_dir = tmp_path / "teacher"
    shutil.copytree(teacher_dir, out_dir)
    before = {s["name"]: s["sha256"] for s in load_manifest(out_dir)["shards"]}
    (out_dir / SHARDS / "shard-00000.parquet").unlink()
    corrupt = out_dir / SHARDS / "shard-00001.parquet"
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    kept_mtime = (out_dir / SHARDS / "shard-00002.parquet").stat().st_mtime_ns
    assert len(verify_shards(out_dir)) == 2
    journal_lines = len((out_dir / JOURNAL).read_text().splitlines())

    with pytest.warns(UserWarning, match="regenerat"):
        manifest = run_teacher(*cfgs, dataclasses.replace(TEACHER, num_actors=1), out_dir, progress=False)
    new_lines = [json.loads(line) for line in (out_dir / JOURNAL).read_text().splitlines()[journal_lines:]]
    assert sorted(e["name"] for e in new_lines) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert (out_dir / SHARDS / "shard-00002.parquet").stat().st_mtime_ns == kept_mtime
    assert verify_shards(out_dir) == []
    # greedy regeneration is deterministic: the regenerated shards are byte-identical
    assert {s["name"]: s["sha256"] for s in manifest["shards"]} == before
    assert {n: e["sha256"] for n, e in read_journal(out_dir).items()} == before


def test_changed_inputs_in_same_dir_are_refused(teacher_dir, cfgs):
    model_cfg, data_cfg = cfgs
    with pytest.raises(ValueError, match=r"(?s)different .*teacher.top_k: 5 -> 6.*new output directory"):
        run_teacher(model_cfg, data_cfg, dataclasses.replace(TEACHER, top_k=6), teacher_dir, progress=False)
    fewer = dataclasses.replace(data_cfg, train=dataclasses.replace(data_cfg.train, limit=4))
    with pytest.raises(ValueError, match=r"(?s)prompts_hash.*data_train.limit: 0 -> 4"):
        run_teacher(model_cfg, fewer, TEACHER, teacher_dir, progress=False)


def test_bad_settings_are_rejected_before_work(cfgs, tmp_path):
    with pytest.raises(ValueError, match="teacher.top_k=300 must be in"):
        run_teacher(*cfgs, dataclasses.replace(TEACHER, top_k=300), tmp_path, progress=False)
    with pytest.raises(ValueError, match="exceeds the base model's max_position_embeddings=512"):
        run_teacher(*cfgs, dataclasses.replace(TEACHER, max_new_tokens=500), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_unknown_files_in_out_dir_are_refused(cfgs, tmp_path):
    (tmp_path / SHARDS).mkdir()
    with pytest.raises(ValueError, match="origin is unknown"):
        run_teacher(*cfgs, TEACHER, tmp_path, progress=False)


def test_sampling_is_seeded_per_prompt(model):
    cfg = dataclasses.replace(TEACHER, temperature=1.0, max_new_tokens=8)
    a, b = [5, 6, 7, 8], [9, 10]
    alone = generate_responses(model, [a], cfg, [], 0, seeds=[11])
    batched = generate_responses(model, [b, a], cfg, [], 0, seeds=[3, 11])
    assert batched[1] == alone[0]  # same prompt, same seed: same sample, whatever its batch
    others = [generate_responses(model, [a], cfg, [], 0, seeds=[s])[0] for s in range(4)]
    assert any(o != alone[0] for o in others)


def test_response_ends_at_first_eos(model):
    cfg = dataclasses.replace(TEACHER, max_new_tokens=10)
    [free] = generate_responses(model, [[5, 6, 7, 8]], cfg, [], 0, seeds=[0])
    stop = free[3]
    [stopped] = generate_responses(model, [[5, 6, 7, 8]], cfg, [stop], 0, seeds=[0])
    assert stopped == free[:free.index(stop) + 1]


def test_cut_response():
    assert cut_response([5, 6, 2, 9, 2], [2], 10) == [5, 6, 2]  # first EOS kept, the rest dropped
    assert cut_response([5, 6, 7, 8], [2], 3) == [5, 6, 7]
    assert cut_response([5, 6], [], 3) == [5, 6]


def test_generate_mode_keeps_the_fingerprint_of_data_made_before_the_switch(teacher_dir):
    fingerprint = json.loads((teacher_dir / "fingerprint.json").read_text())
    assert "responses" not in fingerprint["recipe"]["teacher"]
    assert "engine" not in fingerprint["recipe"]["teacher"]  # the default engine, added later: same hash


def test_the_generation_engine_is_a_seam_with_the_hf_engine_as_default():
    from pipeline.config import _CHOICES, TeacherConfig
    from pipeline.teacher import ENGINES, generate_responses

    assert set(ENGINES) == set(_CHOICES["teacher.engine"]) and ENGINES[TeacherConfig().engine] is generate_responses


def test_recoded_fp8_data_is_what_an_fp8_teacher_would_reuse(teacher_dir, cfgs, tmp_path):
    """pipeline.recode writes a complete teacher directory in fp8: its fingerprint is the one an fp8
    teacher stage records, so that stage reuses it (no shard rewritten) and the fp16 stage refuses it;
    every record equals the source up to fp8 rounding, in fewer bytes."""
    import numpy as np

    from pipeline.recode import main as recode_main

    dst = tmp_path / "fp8"
    assert recode_main([str(teacher_dir), str(dst), "--hidden-dtype", "float8_e4m3"]) == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in (dst / SHARDS).iterdir()}
    fp8 = dataclasses.replace(TEACHER, hidden_dtype="float8_e4m3")
    again = run_teacher(*cfgs, fp8, dst, progress=False)
    assert again == load_manifest(dst) and again["hidden_dtype"] == "float8_e4m3"
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (dst / SHARDS).iterdir()}
    with pytest.raises(ValueError, match="teacher.hidden_dtype: 'float8_e4m3' -> 'float16'"):
        run_teacher(*cfgs, TEACHER, dst, progress=False)
    source, recoded = shards_of(teacher_dir), shards_of(dst)
    for name, seqs in source.items():
        for a, b in zip(seqs, recoded[name]):
            assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.topk_logprobs, b.topk_logprobs)
            scale = np.abs(a.hidden.astype(np.float32)).max(axis=1, keepdims=True)
            assert np.all(np.abs(b.hidden - a.hidden) <= 2 ** -4 * np.abs(a.hidden) + scale / 448 * 2 ** -9 + 1e-12)
    size = lambda d: sum(p.stat().st_size for p in (d / SHARDS).iterdir())  # noqa: E731
    assert size(dst) < size(teacher_dir)
    assert recode_main([str(teacher_dir), str(dst), "--hidden-dtype", "float8_e4m3"]) == 2  # never overwritten


def test_teacher_bench_times_the_engine_against_a_bare_forward_loop(tiny_model_dir):
    """pipeline.teacher_bench: the teacher's per-shard work and a bare forward loop over the same batches
    cover the same recorded positions (checked inside), both timed."""
    from pipeline.teacher_bench import main as teacher_bench

    threads = torch.get_num_threads()
    try:
        report = teacher_bench(["recipe=tiny", f"model.base_model={tiny_model_dir}", "data.train.limit=6",
                                "teacher.max_new_tokens=4", "teacher.batch_size=3", "--prompts", "6", "--repeats", "1",
                                "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert report["prompts"] == 6 and 6 < report["recorded_positions"] <= 6 * 5  # last prompt token + up to 4 new
    assert report["tokens_per_s"]["teacher"] > 0 and report["tokens_per_s"]["bare"] > 0 and report["ratio"] > 0
