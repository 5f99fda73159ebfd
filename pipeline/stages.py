"""A teacher replica split into pipeline stages, each a Ray actor holding a contiguous slice of the base
model's decoder layers (docs/design.md §4.2; `teacher.stages`).

Why: one replica spread over several GPUs by `device_map="auto"` runs its layers in sequence, so only one
GPU works at a time. Here stage s is its own actor (its own GPUs) and the recording pass streams
micro-batches (the teacher's length-sorted batches) through the chain: while stage 1 runs batch i, stage 0
already runs batch i + 1. Ray orders the calls of each actor, and a stage's input is the previous stage's
ObjectRef, so the driver submits a whole shard at once and the stages overlap by themselves.

    stage 0      embeddings + layers [0, a)                    (input_ids, mask) -> hidden
    stage s      layers [a_s, b_s)                             (hidden, mask)    -> hidden
    last stage   layers [.., L) + final norm + output layer    (hidden, mask)    -> teacher records

Each stage reads only its own tensors from the checkpoint (the skeleton is built on the meta device, cut
to the slice, then filled from the safetensors files), so no process ever holds the whole model. The
stages run the model's own decoder forward (its masks, rotary embeddings and layer kinds), cut to their
layers: stage s > 0 enters through `inputs_embeds`, and every stage but the last skips the final norm.
Gemma is refused by name: its embedding layer multiplies by sqrt(H) from a non-persistent buffer that
is not in the checkpoint, which stage 0's loader does not rebuild (it rebuilds rotary buffers only).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from pipeline.base_model import DTYPES, read_tensors, resolve_model_path
from pipeline.config import ModelConfig, TeacherConfig
from pipeline.support import SCALED_EMBEDDINGS


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """Contiguous layer ranges, as even as they go (the first stages take one more when uneven)."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"teacher.stages={stages} must be in [1, num_hidden_layers={num_layers}]")
    base, extra = divmod(num_layers, stages)
    bounds, start = [], 0
    for s in range(stages):
        end = start + base + (s < extra)
        bounds.append(range(start, end))
        start = end
    return bounds


def stage_problems(stages: int, text_config) -> list[str]:
    """Why `stages` cannot split this base model (empty when it can)."""
    if stages <= 1:
        return []
    problems = []
    if text_config.model_type in SCALED_EMBEDDINGS:
        problems.append(f"teacher.stages={stages}: {text_config.model_type} scales its input embeddings by sqrt(H) "
                        "from a buffer that is not in the checkpoint, which the stage loader does not rebuild; "
                        "use teacher.stages=1")
    if stages > text_config.num_hidden_layers:
        problems.append(f"teacher.stages={stages} exceeds the base model's {text_config.num_hidden_layers} layers")
    return problems


def _local_dir(model_cfg: ModelConfig) -> Path:
    path = Path(resolve_model_path(model_cfg))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_cfg.base_model, revision=model_cfg.revision or None, local_files_only=True))


@torch.no_grad()
def load_stage(model_cfg: ModelConfig, index: int, stages: int, device: str = "cpu") -> nn.Module:
    """The causal LM cut to stage `index` of `stages`, holding only that stage's weights, on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = _local_dir(model_cfg)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=model_cfg.trust_remote_code)
    text = config.get_text_config()
    problems = stage_problems(stages, text)
    if problems:
        raise ValueError("; ".join(problems))
    first, last = index == 0, index == stages - 1
    layers = stage_layers(text.num_hidden_layers, stages)[index]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[model_cfg.dtype],
                                                 trust_remote_code=model_cfg.trust_remote_code)
    decoder = model.get_decoder()
    prefix = next(name for name, m in model.named_modules() if m is decoder)
    tied_to_embeddings = model.get_output_embeddings().weight is decoder.embed_tokens.weight
    decoder.layers = nn.ModuleList(decoder.layers[i] for i in layers)
    if not first:
        decoder.embed_tokens = nn.Identity()  # entered through inputs_embeds
    if not last:
        decoder.norm = nn.Identity()
        model.set_output_embeddings(nn.Identity())

    def checkpoint_name(name: str) -> str:  # our (cut) parameter name -> its name in the checkpoint
        head = f"{prefix}.layers."
        if name.startswith(head):
            j, rest = name[len(head):].split(".", 1)
            return f"{head}{layers[int(j)]}.{rest}"
        return name

    wanted = {k: checkpoint_name(k) for k in model.state_dict()}
    tensors = read_tensors(model_dir, wanted)
    out_name = next((k for k, p in model.named_parameters(remove_duplicate=False)
                     if last and p is model.get_output_embeddings().weight), None)
    if out_name and out_name not in tensors and tied_to_embeddings:  # tied: the checkpoint stores the embeddings
        tensors.update(read_tensors(model_dir, {out_name: f"{prefix}.embed_tokens.weight"}))
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise ValueError(f"stage {index} of {stages}: {model_dir} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.to_empty(device=device)
    model.load_state_dict(tensors, strict=True)
    for name, module in list(model.named_modules()):  # non-persistent buffers are not in any checkpoint
        lost = [b for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None]
        if not lost:
            continue
        if not type(module).__name__.endswith("RotaryEmbedding"):
            raise ValueError(f"stage loading cannot rebuild the buffers {lost} of {name} ({type(module).__name__})")
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, type(module)(module.config).to(device))
    return model.eval().requires_grad_(False)


class StageWorker:
    """Ray actor: one stage of a split teacher replica (`run` is called once per micro-batch, in order)."""

    def __init__(self, model_cfg: ModelConfig, teacher_cfg: TeacherConfig, index: int, stages: int):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(teacher_cfg.cpus_per_actor)
        device = "cuda" if teacher_cfg.gpus_per_actor > 0 else "cpu"
        self.model = load_stage(model_cfg, index, stages, device)
        self.cfg, self.index, self.last = teacher_cfg, index, index == stages - 1

    @torch.no_grad()
    def run(self, payload: dict) -> dict:
        """payload: {seqs, mask, ids (stage 0) or hidden, meta, busy}; returns the next stage's payload, or
        at the last stage {records, busy}. `busy` collects (stage, start, end) wall times: the pipeline's own
        timeline, which the tests and the teacher bench read."""
        start = time.time()
        decoder, device = self.model.get_decoder(), self.model.device
        mask = payload["mask"].to(device)
        if self.index == 0:
            hidden = decoder(input_ids=payload["ids"].to(device), attention_mask=mask).last_hidden_state
        else:
            hidden = decoder(inputs_embeds=payload["hidden"].to(device), attention_mask=mask).last_hidden_state
        if self.last:
            from pipeline.teacher import records_from_hidden

            meta = payload["meta"]
            records = records_from_hidden(self.model, meta["prompt_ids"], meta["prompts"], payload["seqs"], hidden,
                                          self.cfg)
            return {"records": records, "busy": payload["busy"] + [(self.index, start, time.time())]}
        return {"hidden": hidden.cpu(), "mask": payload["mask"], "seqs": payload["seqs"], "meta": payload["meta"],
                "busy": payload["busy"] + [(self.index, start, time.time())]}


def start_stages(model_cfg: ModelConfig, teacher_cfg: TeacherConfig) -> list:
    """The stage actors of one replica (each with the teacher's cpus_per_actor and gpus_per_actor)."""
    import ray

    actor = ray.remote(num_cpus=teacher_cfg.cpus_per_actor, num_gpus=teacher_cfg.gpus_per_actor)(StageWorker)
    return [actor.remote(model_cfg, teacher_cfg, s, teacher_cfg.stages) for s in range(teacher_cfg.stages)]


def staged_records(stage_actors: list, batches: list[dict]) -> list[dict]:
    """Every micro-batch through the chain of stages, all submitted at once (the stages overlap); returns
    the last stage's results in batch order. A batch: {seqs, prompt_ids, prompts}."""
    import ray

    from pipeline.teacher import right_padded

    refs = []
    for b in batches:
        ids, mask = right_padded(b["seqs"])
        ref = {"ids": ids, "mask": mask, "seqs": b["seqs"], "busy": [],
               "meta": {"prompt_ids": b["prompt_ids"], "prompts": b["prompts"]}}
        for stage in stage_actors:
            ref = stage.run.remote(ref)
        refs.append(ref)
    return ray.get(refs)


def overlap_fraction(busy: list[tuple[int, float, float]]) -> float:
    """The share of the stages' busy time spent while another stage was busy too: 0 when they ran strictly in
    turn (what device_map="auto" does), towards 1 as the pipeline fills. `busy` = (stage, start, end)."""
    events = sorted([(a, 1) for _, a, _ in busy] + [(b, -1) for _, _, b in busy])
    total = sum(b - a for _, a, b in busy)
    shared, active, last = 0.0, 0, None
    for t, step in events:
        if last is not None and active >= 2:
            shared += active * (t - last)
        active, last = active + step, t
    return shared / total if total > 0 else 0.0
