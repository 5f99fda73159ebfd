"""A teacher replica split into pipeline stages (pipeline/stages.py): each stage holds only its slice of the
weights, the chained stages compute exactly the whole model's records, the teacher stage through Ray Data
with split replicas writes the same shards as whole ones, and the stages really work at the same time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.base_model import load_base_model
from pipeline.config import DataConfig, ModelConfig, PromptSource, TeacherConfig
from pipeline.shards import read_shard
from pipeline.stages import load_stage, overlap_fraction, stage_layers, stage_problems
from pipeline.teacher import SHARDS, TeacherWorker, load_manifest, records_from_hidden, right_padded, run_teacher, teacher_records
from tests.conftest import build_tiny_model

SEQS = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15], [16, 17, 18, 19, 20]]
PROMPT_LENS = [3, 1, 2]


def test_stage_layers_split_evenly_and_in_order():
    assert stage_layers(30, 2) == [range(0, 15), range(15, 30)]
    assert stage_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="teacher.stages"):
            stage_layers(4, bad)


def chained_hidden(stages: list, seqs: list[list[int]]) -> torch.Tensor:
    ids, mask = right_padded(seqs)
    hidden = stages[0].get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    for stage in stages[1:]:
        hidden = stage.get_decoder()(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
    return hidden


@pytest.mark.parametrize("family, extra", [
    ("LlamaConfig", {}),
    ("LlamaConfig", {"tie_word_embeddings": False}),
    ("MistralConfig", {"sliding_window": 4}),  # the window mask comes from the model's own forward
    ("Qwen2Config", {}),
])
def test_chained_stages_equal_the_whole_model_and_hold_only_their_slice(tmp_path, family, extra):
    path = build_tiny_model(tmp_path / "m", num_layers=5, config_class=family, **extra)
    cfg = ModelConfig(base_model=str(path))
    whole, _ = load_base_model(cfg)
    stages = [load_stage(cfg, i, 3) for i in range(3)]
    prompts = [s[:n] for s, n in zip(SEQS, PROMPT_LENS)]
    responses = [s[n:] for s, n in zip(SEQS, PROMPT_LENS)]
    teacher_cfg = TeacherConfig(top_k=4)
    expected = teacher_records(whole, ["a", "b", "c"], prompts, responses, teacher_cfg)
    got = records_from_hidden(stages[-1], ["a", "b", "c"], prompts, SEQS, chained_hidden(stages, SEQS), teacher_cfg)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g.hidden, e.hidden, atol=1e-6)
        np.testing.assert_allclose(g.topk_logprobs, e.topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(g.tail_logprob, e.tail_logprob, atol=1e-5)
        assert (g.topk_ids == e.topk_ids).all() and (g.tokens == e.tokens).all()

    assert_each_holds_its_slice(whole, stages)


def assert_each_holds_its_slice(whole, stages: list) -> None:
    """Each stage holds its own layers, equal to the whole model's, and nothing of the others: stage 0 the
    embeddings, the last one the final norm and the output layer."""
    whole_params = dict(whole.named_parameters(remove_duplicate=False))
    layer, last = "model.layers.", len(stages) - 1
    for index, stage in enumerate(stages):
        own = stage_layers(whole.config.num_hidden_layers, len(stages))[index]
        names = dict(stage.named_parameters(remove_duplicate=False))
        assert len(stage.get_decoder().layers) == len(own)
        for name, p in names.items():
            if name.startswith(layer):
                j, rest = name[len(layer):].split(".", 1)
                name = f"{layer}{own[int(j)]}.{rest}"
            torch.testing.assert_close(p, whole_params[name], rtol=0, atol=0)
        assert any(n.startswith("model.embed_tokens") for n in names) == (index == 0)
        assert any(n.startswith(("model.norm", "lm_head")) for n in names) == (index == last)


def test_stages_read_their_tensors_from_a_sharded_checkpoint(tmp_path):
    """Large models come as several safetensors files and model.safetensors.index.json: each stage finds its
    tensors through the index (pipeline/base_model.py read_tensors, the lookup the drafter's embedding table
    uses too: tests/test_train.py)."""
    whole, _ = load_base_model(ModelConfig(base_model=str(build_tiny_model(tmp_path / "m", num_layers=4))))
    whole.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = {p.name for p in (tmp_path / "sharded").glob("*.safetensors")}
    assert len(files) > 2 and "model.safetensors" not in files
    cfg = ModelConfig(base_model=str(tmp_path / "sharded"))
    assert_each_holds_its_slice(whole, [load_stage(cfg, i, 3) for i in range(3)])


def test_models_that_scale_their_input_embeddings_are_refused_by_name(tmp_path):
    path = build_tiny_model(tmp_path / "g", num_layers=2, config_class="Gemma2Config", head_dim=8)
    with pytest.raises(ValueError, match="gemma2 scales its input embeddings"):
        load_stage(ModelConfig(base_model=str(path)), 1, 2)
    from transformers import AutoConfig

    assert stage_problems(1, AutoConfig.from_pretrained(path)) == []


def test_overlap_fraction():
    assert overlap_fraction([(0, 0, 1), (1, 1, 2), (0, 2, 3)]) == 0.0  # strictly in turn
    assert overlap_fraction([(0, 0, 2), (1, 1, 3)]) == pytest.approx(0.5)  # 1 s of each stage's 2 s shared
    assert overlap_fraction([(0, 0, 1), (1, 0, 1)]) == 1.0


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama (6 layers, wide enough that a stage's forward takes milliseconds) with a chat template."""
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("chat_model"), num_layers=6, hidden_size=256)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(path)
    return path


def test_split_replicas_write_the_shards_a_whole_replica_writes_and_overlap(ray_local, chat_model, tmp_path):
    """ShareGPT replies recorded through the teacher stage (Ray Data) by a replica split into 2 stage actors:
    the records a whole replica computes, and inside a shard the two stages worked at once."""
    from pipeline.base_model import load_tokenizer
    from pipeline.teacher import training_prompts

    model_cfg = ModelConfig(base_model=str(chat_model))
    data_cfg = DataConfig(train=PromptSource(path="sharegpt", limit=8), max_prompt_tokens=200)
    whole = TeacherConfig(responses="corpus", num_actors=1, batch_size=2, max_new_tokens=40, top_k=5, shard_size=4)
    split = dataclasses.replace(whole, stages=2)
    run_teacher(model_cfg, data_cfg, split, tmp_path / "split", progress=False)
    m = load_manifest(tmp_path / "split")
    prompts, _ = training_prompts(data_cfg, load_tokenizer(model_cfg), "corpus")
    specs = [{"id": p.id, "input_ids": p.input_ids, "reply_ids": p.reply_ids} for p in prompts]
    reference = TeacherWorker(model_cfg, whole, str(tmp_path), eos_id=0, pad_id=0, seed=0)  # in this process
    for i, shard in enumerate(m["shards"]):
        got = read_shard(tmp_path / "split" / SHARDS / shard["name"], m["hidden_size"], m["top_k"], m["hidden_dtype"])
        expected = reference.records(specs[i * 4:(i + 1) * 4])
        assert len(got) == len(expected) == 4
        for x, y in zip(expected, got):
            assert x.prompt_id == y.prompt_id and (x.tokens == y.tokens).all() and (x.topk_ids == y.topk_ids).all()
            np.testing.assert_allclose(y.hidden, x.hidden, atol=2e-3)  # float16 storage
            np.testing.assert_allclose(y.topk_logprobs, x.topk_logprobs, atol=1e-5)
            np.testing.assert_allclose(y.tail_logprob, x.tail_logprob, atol=1e-5)

    # the pipeline itself: a shard's 4 micro-batches go in at once and the stages overlap (sequential
    # stages, as one replica over device_map="auto" runs them, would give exactly 0)
    worker = TeacherWorker(model_cfg, split, str(tmp_path), eos_id=0, pad_id=0, seed=0)
    worker.records(specs)  # the first shard also waits for the later stages to finish loading
    worker.records(specs)
    assert len(worker.busy) == 2 * 4 and {s for s, _, _ in worker.busy} == {0, 1}
    assert overlap_fraction(worker.busy) > 0.1, worker.busy


def test_split_replicas_need_corpus_responses(chat_model, tmp_path):
    data_cfg = DataConfig(train=PromptSource(path="sharegpt", limit=4), max_prompt_tokens=200)
    with pytest.raises(ValueError, match="teacher.stages=2 splits the recording pass"):
        run_teacher(ModelConfig(base_model=str(chat_model)), data_cfg, TeacherConfig(stages=2, max_new_tokens=8),
                    tmp_path, progress=False)
