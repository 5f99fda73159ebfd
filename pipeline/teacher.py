"""Teacher stage: regenerate responses with the frozen base model and record its hidden states and
next-token distributions as parquet shards (layout: pipeline/shards.py; docs/design.md §4).

    import ray; ray.init()   # the pipeline driver does this
    manifest = run_teacher(cfg.model, cfg.data, cfg.teacher, run_dir / "teacher", seed=cfg.run.seed)

Layout of `out_dir` (it must be storage the Ray workers share: they write the shards):
    fingerprint.json   what the data is made from; a rerun with other inputs is refused
    progress.jsonl     journal, one line per finished shard {name, sha256, rows, tokens}
    shards/shard-00000.parquet ...   shard i = training prompts [i*S, (i+1)*S)
    manifest.json      written last; its presence means the stage is done
A rerun skips every journaled shard whose file still matches its checksum and regenerates the rest.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline import atomic
from pipeline.base_model import base_model_fingerprint, check_vocab, load_base_model, load_tokenizer, resolve_model_path
from pipeline.config import ADDED_LATER, DataConfig, ModelConfig, TeacherConfig
from pipeline.gguf import gguf_source
from pipeline.lineage import changed_keys, flatten, hash_json, hashed_settings, sha256_file, tokenizer_hash
from pipeline.shards import SCHEMA_VERSION, TeacherSequence, non_finite, write_shard
from pipeline.stages import overlap_fraction, stage_problems, staged_records, start_stages
from pipeline.support import output_logits

SHARDS, JOURNAL, FINGERPRINT, MANIFEST = "shards", "progress.jsonl", "fingerprint.json", "manifest.json"
# may change between resumes (a split replica computes the same records as a whole one)
EXECUTION_ONLY = ("num_actors", "gpus_per_actor", "cpus_per_actor", "batch_size", "stages")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _write_json(path: Path, obj: dict) -> None:
    atomic.write_json(path, obj, sort_keys=True)


def load_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} not found: run the teacher stage first")
    return json.loads(path.read_text())


def verify_shards(out_dir: str | Path) -> list[str]:
    """Problems with the shards a manifest lists (missing or checksum mismatch); [] when all are intact."""
    out_dir = Path(out_dir)
    problems = []
    for entry in load_manifest(out_dir)["shards"]:
        path = out_dir / SHARDS / entry["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: corrupt (sha256 does not match the manifest)")
    return problems


def read_journal(out_dir: Path) -> dict[str, dict]:
    """name -> the latest journal entry for it; a torn last line (crash mid-write) is skipped."""
    entries: dict[str, dict] = {}
    path = out_dir / JOURNAL
    if path.is_file():
        for line in filter(str.strip, path.read_text().splitlines()):
            try:
                entry = json.loads(line)
                entries[entry["name"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                warnings.warn(f"{path}: skipping unreadable journal line {line[:80]!r}")
    return entries


def _append_journal(out_dir: Path, entry: dict) -> None:
    with open(out_dir / JOURNAL, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def completed_shards(out_dir: Path, expected_rows: dict[str, int]) -> dict[str, dict]:
    """Journaled shards whose file is intact; warns about the ones that must be regenerated."""
    done = {}
    for name, entry in read_journal(out_dir).items():
        path = out_dir / SHARDS / name
        if name not in expected_rows or entry.get("rows") != expected_rows[name]:
            warnings.warn(f"journal entry for {name} does not fit this prompt set; regenerating it")
        elif not path.is_file():
            warnings.warn(f"{path} is missing; regenerating it")
        elif sha256_file(path) != entry.get("sha256"):
            warnings.warn(f"{path} is corrupt or partial (checksum mismatch); regenerating it")
        else:
            done[name] = entry
    return done


def data_fingerprint(model_cfg: ModelConfig, data_cfg: DataConfig, teacher_cfg: TeacherConfig, tokenizer,
                     prompts: list, seed: int) -> dict:
    """Everything the teacher data depends on. Execution settings (EXECUTION_ONLY) are left out."""
    teacher = hashed_settings({k: v for k, v in dataclasses.asdict(teacher_cfg).items() if k not in EXECUTION_ONLY},
                              ADDED_LATER["teacher"])
    data_train = hashed_settings(dataclasses.asdict(data_cfg.train), ADDED_LATER["data"])
    recipe = {"teacher": teacher, "data_train": data_train, "seed": seed,
              "chat_template": data_cfg.chat_template, "max_prompt_tokens": data_cfg.max_prompt_tokens,
              "model_dtype": model_cfg.dtype}
    return {
        "schema_version": SCHEMA_VERSION,
        "base_model_hash": base_model_fingerprint(model_cfg),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        # with corpus replies the replies are part of the data (generate mode keeps its original hash)
        "prompts_hash": hash_json([[p.id, p.input_ids] + ([p.reply_ids] if teacher_cfg.responses == "corpus" else [])
                                   for p in prompts]),
        "recipe": recipe,
        "recipe_hash": hash_json(recipe),
    }


def claim_out_dir(out_dir: Path, fingerprint: dict) -> None:
    """Refuse an out_dir holding data made from other inputs; record the fingerprint in a new one."""
    path = out_dir / FINGERPRINT
    if path.is_file():
        changed = fingerprint_changes(json.loads(path.read_text()), fingerprint)
        if changed:
            raise ValueError(f"{out_dir} holds teacher data made from a different base model, tokenizer, prompt set "
                             "or teacher settings:\n  " + "\n  ".join(changed)
                             + f"\nPick a new output directory, or delete {out_dir} to regenerate.")
        return
    if any((out_dir / n).exists() for n in (SHARDS, JOURNAL, MANIFEST)):
        raise ValueError(f"{out_dir} holds teacher files but no {FINGERPRINT}, so their origin is unknown. "
                         f"Pick a new output directory, or delete {out_dir} to regenerate.")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, fingerprint)


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every leaf that differs (the summary hash aside); [] when the data matches."""
    flat_old, flat_new = flatten(old), flatten(new)
    return [f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in changed_keys(old, new, ("recipe_hash",))]


def training_prompts(data_cfg: DataConfig, tokenizer, responses: str = "generate",
                     quiet: bool = False) -> tuple[list, dict]:
    """The training prompts and their accounting; prompts whose last user turn is also an eval prompt's
    (case and whitespace aside) are removed and counted as `overlaps_eval`: checked, not assumed. With
    responses="corpus", prompts the corpus has no usable reply for are removed and counted as `no_reply`.
    `quiet`: no line about the removals (a caller that loads them again after saying so once)."""
    from data.corpora import normalize
    from data.prompts import load_prompt_set

    prompts, accounting = load_prompt_set(data_cfg.train, tokenizer, data_cfg.max_prompt_tokens,
                                          data_cfg.chat_template)
    # only the eval texts matter here (the eval stage checks their lengths): no length limit
    eval_prompts, _ = load_prompt_set(data_cfg.eval, tokenizer, 1 << 62, data_cfg.chat_template)
    eval_texts = {normalize(p.user_text) for p in eval_prompts if p.user_text.strip()}
    kept = [p for p in prompts if normalize(p.user_text) not in eval_texts]
    if len(kept) < len(prompts) and not quiet:
        print(f"teacher: {len(prompts) - len(kept)} training prompt(s) are also eval prompts; removed")
    overlapping, no_reply = len(prompts) - len(kept), 0
    if responses == "corpus":
        if not any(p.reply_ids for p in kept):
            raise ValueError(f"teacher.responses=corpus needs a training corpus with replies (e.g. sharegpt); "
                             f"{data_cfg.train.path!r} has none: use teacher.responses=generate")
        with_reply = [p for p in kept if p.reply_ids]
        no_reply = len(kept) - len(with_reply)
        if no_reply and not quiet:
            print(f"teacher: {no_reply} training prompt(s) have no reply in the corpus; removed")
        kept = with_reply
    if not kept:
        raise ValueError(f"no training prompts left in {data_cfg.train.path!r} after filtering: {accounting}")
    # per source: considered = kept + skipped; then the removals over all sources
    return kept, {"sources": accounting, "loaded": len(prompts), "overlaps_eval_removed": overlapping,
                  **({"no_reply_removed": no_reply} if responses == "corpus" else {}), "used": len(kept)}


def settings_problems(teacher_cfg: TeacherConfig, config, prompts: list) -> list[str]:
    """Teacher settings that cannot work with this base model (text config) and these prompts. Checked by
    the pipeline before Ray starts (pipeline/main.py preflight) and again here for direct callers."""
    problems = []
    if not 0 < teacher_cfg.top_k < config.vocab_size:
        problems.append(f"teacher.top_k={teacher_cfg.top_k} must be in [1, vocab_size={config.vocab_size})")
    longest = max(len(p.input_ids) for p in prompts) + teacher_cfg.max_new_tokens
    if teacher_cfg.stages > 1 and teacher_cfg.responses != "corpus":
        problems.append(f"teacher.stages={teacher_cfg.stages} splits the recording pass of teacher-forced responses "
                        "(teacher.responses=corpus); generation runs in one actor: use teacher.stages=1")
    problems += stage_problems(teacher_cfg.stages, config)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and longest > max_positions:
        problems.append(f"the longest training prompt + teacher.max_new_tokens = {longest} tokens exceeds the base "
                        f"model's max_position_embeddings={max_positions}")
    return problems


def run_teacher(model_cfg: ModelConfig, data_cfg: DataConfig, teacher_cfg: TeacherConfig, out_dir: Path,
                seed: int = 0, progress: bool = True) -> dict:
    """Generate (or finish, or just verify) the teacher shards in `out_dir`; returns the manifest.
    Expects Ray to be initialized."""
    from transformers import AutoConfig

    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(model_cfg)
    model_path = resolve_model_path(model_cfg)
    config = AutoConfig.from_pretrained(model_path, revision=model_cfg.revision or None,
                                        trust_remote_code=model_cfg.trust_remote_code).get_text_config()
    check_vocab(tokenizer, config.vocab_size, model_cfg.base_model)
    prompts, accounting = training_prompts(data_cfg, tokenizer, teacher_cfg.responses)
    problems = settings_problems(teacher_cfg, config, prompts)
    if problems:
        raise ValueError("; ".join(problems))
    fingerprint = data_fingerprint(model_cfg, data_cfg, teacher_cfg, tokenizer, prompts, seed)
    claim_out_dir(out_dir, fingerprint)

    if (out_dir / MANIFEST).is_file():
        problems = verify_shards(out_dir)
        if not problems:
            return load_manifest(out_dir)
        warnings.warn("teacher manifest exists but shards are damaged, regenerating them:\n  " + "\n  ".join(problems))
        (out_dir / MANIFEST).unlink()

    size = teacher_cfg.shard_size
    corpus = teacher_cfg.responses == "corpus"
    specs = [{"name": shard_name(i), "prompts": json.dumps([{"id": p.id, "input_ids": p.input_ids,
                                                             **({"reply_ids": p.reply_ids} if corpus else {})}
                                                            for p in prompts[start:start + size]])}
             for i, start in enumerate(range(0, len(prompts), size))]
    expected_rows = {s["name"]: len(json.loads(s["prompts"])) for s in specs}
    (out_dir / SHARDS).mkdir(exist_ok=True)
    atomic.sweep(out_dir / SHARDS)  # left by a writer that died mid-write
    done = completed_shards(out_dir, expected_rows)
    pending = [s for s in specs if s["name"] not in done]
    if pending:
        done.update(_generate_shards(pending, len(specs), model_cfg, teacher_cfg, tokenizer, out_dir, seed, progress))
    assert set(done) == set(expected_rows), "every shard is done once generation returns"

    shards = [{k: done[s["name"]][k] for k in ("name", "sha256", "rows", "tokens")} for s in specs]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "base_model": {"name": model_cfg.base_model, "path": model_path, "revision": model_cfg.revision,
                       "gguf": gguf_source(model_path)},
        "prompt_accounting": accounting,
        **{k: fingerprint[k] for k in ("base_model_hash", "tokenizer_hash", "recipe_hash", "prompts_hash", "recipe")},
        "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
        "top_k": teacher_cfg.top_k, "hidden_dtype": teacher_cfg.hidden_dtype,
        "num_sequences": sum(s["rows"] for s in shards), "num_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "created_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    _write_json(out_dir / MANIFEST, manifest)
    return manifest


def _generate_shards(pending: list[dict], total: int, model_cfg: ModelConfig, teacher_cfg: TeacherConfig,
                     tokenizer, out_dir: Path, seed: int, progress: bool) -> dict[str, dict]:
    """Run the pending shard specs through a pool of TeacherWorker actors; journal each as it lands."""
    import logging

    import ray
    from tqdm.auto import tqdm

    # our bar counts shards; Ray Data's plan lines and its "progress bars disabled" notice are noise here
    # (its full logs stay in the Ray session's logs/ray-data)
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ds = ray.data.from_items(pending, override_num_blocks=len(pending))  # one shard per block: results stream
    split = teacher_cfg.stages > 1  # then the actor only coordinates; its stage actors hold the CPUs and GPUs
    ds = ds.map_batches(
        TeacherWorker, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(teacher_cfg.num_actors, len(pending))),
        num_gpus=0 if split else teacher_cfg.gpus_per_actor, num_cpus=0 if split else teacher_cfg.cpus_per_actor,
        fn_constructor_kwargs={"model_cfg": model_cfg, "teacher_cfg": teacher_cfg,
                               "shards_dir": str(out_dir / SHARDS), "eos_id": tokenizer.eos_token_id,
                               "pad_id": tokenizer.pad_token_id, "seed": seed},
    )  # Ray Data already gives its actors max_restarts=-1 and max_task_retries=-1 (a crashed actor is
    # restarted and its shard retried); on Ray 2.60 passing them means the deprecated **ray_remote_args.
    ds.context.enable_progress_bars = False  # our bar counts shards
    finished, overlaps = {}, []
    bar = tqdm(total=total, initial=total - len(pending), desc="teacher shards", unit="shard", disable=not progress)
    before = set(threading.enumerate())
    try:
        for row in ds.iter_rows():
            entry = {"name": str(row["name"]), "sha256": str(row["sha256"]), "rows": int(row["rows"]),
                     "tokens": int(row["tokens"])}
            _append_journal(out_dir, entry)
            finished[entry["name"]] = entry
            if row["overlap"] >= 0:
                overlaps.append(float(row["overlap"]))
            bar.update(1)
    except Exception as e:  # noqa: BLE001 - re-raised with the cause's own last line and how to resume
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise RuntimeError(f"teacher stage failed after {len(finished)} of {len(pending)} pending shards "
                           f"({lines[-1] if lines else e.__class__.__name__}); finished shards are journaled in "
                           f"{out_dir / JOURNAL} and a rerun resumes from them") from e
    finally:
        bar.close()
        _stop_executors(set(threading.enumerate()) - before)
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"teacher: {len(finished)} shard(s) generated; driver peak RSS {peak_mb:.0f} MB "
          "(results stream shard by shard: the driver holds no teacher data)", flush=True)
    if overlaps:
        print(f"teacher: {teacher_cfg.stages} stages per replica worked at the same time for "
              f"{100 * sum(overlaps) / len(overlaps):.0f}% of their busy time (mean over shards; 0% = in turn)",
              flush=True)
    return finished


def _stop_executors(threads, timeout_s: float = 60.0) -> None:
    """Stop the Ray Data executor threads this stage started and wait until they have ended.

    A Ray Data executor schedules from its own thread. When the iteration stops early (Ctrl-C, SIGTERM,
    a failed shard), Ray Data flags the executor to stop but waits only 2 s for its thread; a thread still
    inside a scheduling step then calls Ray after the driver's `ray.shutdown()`, and Ray's core worker
    ends the whole process with exit code 1: the interrupted run lost its exit code and its last line.
    After a normal end the thread has already finished and this returns at once."""
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:  # another Ray layout: nothing to stop by this name
        return
    for thread in threads:
        if isinstance(thread, StreamingExecutor):
            thread.shutdown(force=True)  # a no-op when Ray Data has already shut it down
            thread.join(timeout_s)
            if thread.is_alive():
                warnings.warn(f"Ray Data's executor thread {thread.name} did not stop within {timeout_s:.0f} s",
                              stacklevel=2)


class TeacherWorker:
    """Ray Data actor: loads the frozen base model once, then turns one shard spec into one shard file."""

    def __init__(self, model_cfg: ModelConfig, teacher_cfg: TeacherConfig, shards_dir: str, eos_id, pad_id, seed: int):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # this process is ours: no per-actor "Loading weights" bars
        self.cfg, self.shards_dir, self.seed = teacher_cfg, Path(shards_dir), seed
        if teacher_cfg.stages > 1:  # a split replica: this actor feeds its stage actors (pipeline/stages.py)
            from transformers import AutoConfig, GenerationConfig

            self.model, self.stages, self.busy = None, start_stages(model_cfg, teacher_cfg), []
            path = resolve_model_path(model_cfg)
            try:
                generation = GenerationConfig.from_pretrained(path)
            except OSError:  # no generation_config.json: the model config's own token ids
                generation = GenerationConfig.from_model_config(
                    AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code))
        else:
            torch.set_num_threads(teacher_cfg.cpus_per_actor)  # as many threads as Ray reserved cores
            gpus = teacher_cfg.gpus_per_actor
            device_map = "auto" if gpus >= 1 else None  # one replica spread over the actor's GPUs
            self.model, _ = load_base_model(model_cfg, device="cuda" if 0 < gpus < 1 else "cpu", device_map=device_map)
            generation = self.model.generation_config
        model_eos = generation.eos_token_id  # e.g. Llama 3: end_of_text and eot_id
        model_eos = model_eos if isinstance(model_eos, list) else [model_eos]
        self.eos_ids = sorted({t for t in [eos_id, *model_eos] if t is not None})
        self.pad_id = pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0)

    def batches(self, prompts: list[dict]) -> list[list[int]]:
        """Prompt indices in batches of similar lengths: a batch is padded to its longest prompt (and, with
        corpus replies, its longest prompt + reply), so length-sorted batches waste far less compute on
        padding (real chat prompts range from 10 to 500 tokens). Sorting is stable: deterministic shards."""
        def length(p: dict) -> int:
            reply = len(p["reply_ids"]) if self.cfg.responses == "corpus" else 0
            return len(p["input_ids"]) + min(reply, self.cfg.max_new_tokens)

        order = sorted(range(len(prompts)), key=lambda i: length(prompts[i]))
        return [order[start:start + self.cfg.batch_size] for start in range(0, len(order), self.cfg.batch_size)]

    def responses(self, chunk: list[dict]) -> list[list[int]]:
        """The response of each prompt: the corpus's reply cut like a generation (teacher-forced), or the
        base model's own generation (`generate_responses`, one seed per prompt)."""
        if self.cfg.responses == "corpus":
            return [cut_response(p["reply_ids"], self.eos_ids, self.cfg.max_new_tokens) for p in chunk]
        seeds = [prompt_seed(self.seed, p["id"]) for p in chunk]
        return ENGINES[self.cfg.engine](self.model, [p["input_ids"] for p in chunk], self.cfg, self.eos_ids,
                                        self.pad_id, seeds)

    def records(self, prompts: list[dict]) -> list[TeacherSequence]:
        """A shard's sequences, in prompt order."""
        batches = self.batches(prompts)
        chunks = []
        for batch in batches:
            chunk = [prompts[i] for i in batch]
            chunks.append({"prompt_ids": [p["id"] for p in chunk], "prompts": [p["input_ids"] for p in chunk],
                           "responses": self.responses(chunk)})
        by_index = {}
        for batch, records in zip(batches, self.batch_records(chunks)):
            by_index.update(zip(batch, records))
        return [by_index[i] for i in range(len(prompts))]

    def batch_records(self, chunks: list[dict]) -> list[list[TeacherSequence]]:
        """The records of each batch ({prompt_ids, prompts, responses}): this actor's whole model, batch by
        batch, or a split replica's stage pipeline, every batch of the shard at once (the stages overlap)."""
        if self.model is not None:
            return [teacher_records(self.model, c["prompt_ids"], c["prompts"], c["responses"], self.cfg)
                    for c in chunks]
        results = staged_records(self.stages, [
            {"prompt_ids": c["prompt_ids"], "prompts": c["prompts"],
             "seqs": [p + r for p, r in zip(c["prompts"], c["responses"])]} for c in chunks])
        self.busy = [span for r in results for span in r["busy"]]  # the stages' timeline of this shard
        return [r["records"] for r in results]

    def __call__(self, batch: dict) -> dict:
        assert len(batch["name"]) == 1, "map_batches must run with batch_size=1 (one shard per call)"
        name, prompts = str(batch["name"][0]), json.loads(batch["prompts"][0])
        seqs = self.records(prompts)
        path = self.shards_dir / name
        write_shard(seqs, path, self.cfg.hidden_dtype)
        return {"name": [name], "sha256": [sha256_file(path)], "rows": [len(seqs)],
                "tokens": [sum(len(s.tokens) - 1 for s in seqs)],
                "overlap": [overlap_fraction(self.busy) if self.model is None else -1.0]}


def prompt_seed(seed: int, prompt_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:8], "little") & (2**63 - 1)


class GumbelNoise:
    """Logits processor that turns greedy decoding into sampling at `temperature` (Gumbel-max trick), with
    one RNG per prompt: a prompt's sample does not depend on the batch or shard it lands in."""

    def __init__(self, temperature: float, seeds: list[int]):
        self.temperature = temperature
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        return scores.float() / self.temperature + gumbel.to(scores.device, torch.float32)


@torch.no_grad()
def generate_responses(model, prompts: list[list[int]], cfg: TeacherConfig, eos_ids: list[int], pad_id: int,
                       seeds: list[int]) -> list[list[int]]:
    """Left-padded batched generation; each response ends at its first EOS (kept) or at max_new_tokens."""
    from transformers import GenerationConfig, LogitsProcessorList

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, p in enumerate(prompts):
        input_ids[b, width - len(p):] = torch.tensor(p)
        attention_mask[b, width - len(p):] = 1
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                               eos_token_id=eos_ids or None, pad_token_id=pad_id)
    processors = LogitsProcessorList([GumbelNoise(cfg.temperature, seeds)] if cfg.temperature > 0 else [])
    out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                         generation_config=gen_cfg, logits_processor=processors)
    return [cut_response(row, eos_ids, cfg.max_new_tokens) for row in out[:, width:].tolist()]


# teacher.engine -> (model, prompts, cfg, eos_ids, pad_id, seeds) -> responses, each cut by `cut_response`:
# the generation seam. A serving engine (vLLM, TensorRT-LLM) is a new entry here and in config._CHOICES;
# it must give each prompt its own seeded sample (or the greedy continuation), whatever the batch.
ENGINES = {"hf": generate_responses}


def cut_response(tokens: list[int], eos_ids: list[int], max_new_tokens: int) -> list[int]:
    """A response ends at its first EOS (kept) or after max_new_tokens tokens."""
    end = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
    return list(tokens[:min(end, max_new_tokens)])


def right_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of right-padded sequences (causal attention: padding after a sequence
    changes none of its positions)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, s in enumerate(seqs):
        input_ids[b, :len(s)] = torch.tensor(s)
        attention_mask[b, :len(s)] = 1
    return input_ids, attention_mask


def decoder_hidden(model, seqs: list[list[int]]) -> torch.Tensor:
    """Post-norm hidden states (B, T, H) of right-padded sequences in one batched forward of the decoder."""
    input_ids, attention_mask = right_padded(seqs)
    return model.get_decoder()(input_ids=input_ids.to(model.device),
                               attention_mask=attention_mask.to(model.device)).last_hidden_state


@torch.no_grad()
def teacher_records(model, prompt_ids: list[str], prompts: list[list[int]], responses: list[list[int]],
                    cfg: TeacherConfig) -> list[TeacherSequence]:
    """One forward over prompt+response (right-padded; causal attention keeps real positions exact), then per
    stored position (last prompt token .. last response token): post-norm hidden, top-k log-probs, tail."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    return records_from_hidden(model, prompt_ids, prompts, seqs, decoder_hidden(model, seqs), cfg)


@torch.no_grad()
def records_from_hidden(model, prompt_ids: list[str], prompts: list[list[int]], seqs: list[list[int]],
                        hidden_BTH: torch.Tensor, cfg: TeacherConfig) -> list[TeacherSequence]:
    """The records of `seqs` (prompt + response) from their post-norm hidden states; `model` needs only its
    output layer (the last stage of a split replica has nothing else: pipeline/stages.py)."""
    head_device = model.get_output_embeddings().weight.device
    records = []
    for b, (pid, prompt, seq) in enumerate(zip(prompt_ids, prompts, seqs)):
        hidden_NH = hidden_BTH[b, len(prompt) - 1:len(seq)].to(head_device)
        logits_NV = output_logits(model, hidden_NH).float()  # soft-capped where the model caps (Gemma 2)
        log_z_N = logits_NV.logsumexp(-1)
        top_logits_NK, top_ids_NK = logits_NV.topk(cfg.top_k, dim=-1)  # sorted, best first
        # log of the mass outside the top-k, summed over those tokens themselves (no cancellation as in
        # log(1 - sum(top-k probs))); in place over one (N, V) buffer: 2 passes instead of a copy + logsumexp.
        # A tail below float32's smallest normal is recorded as that (never -inf: records are finite).
        probs_NV = logits_NV.sub_(log_z_N[:, None]).exp_().scatter_(-1, top_ids_NK, 0.0)
        tail_N = probs_NV.sum(-1).clamp_min(torch.finfo(torch.float32).tiny).log()
        hidden = hidden_NH.float().cpu().numpy()
        if cfg.hidden_dtype == "float16" and np.abs(hidden).max() > np.finfo(np.float16).max:
            raise ValueError("hidden states overflow float16; set teacher.hidden_dtype to bfloat16 or float32")
        record = TeacherSequence(
            prompt_id=pid, prompt_len=len(prompt), tokens=np.asarray(seq[len(prompt) - 1:], dtype=np.int32),
            hidden=hidden, topk_ids=top_ids_NK.int().cpu().numpy(),
            topk_logprobs=(top_logits_NK - log_z_N[:, None]).cpu().numpy(), tail_logprob=tail_N.cpu().numpy())
        problem = non_finite(record)
        if problem:  # never written: a shard is whole and usable, or absent
            raise ValueError(f"the base model produced {problem} for prompt {pid!r} (model.dtype={model.dtype}): "
                             "an overflow in this dtype? run the teacher with model.dtype=float32 or bfloat16")
        records.append(record)
    return records
