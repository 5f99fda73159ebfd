"""Train stage: distill the base model's teacher shards into a ReDrafter drafter (docs/design.md §1, §4)
with Ray Train (TorchTrainer) workers, each running one DeepSpeed engine (pipeline/distributed.py).

    python -m pipeline.main recipe=tiny 'run.stages=[teacher,train]'     # the stage, through the pipeline

    import ray; ray.init()   # in Python: the pipeline driver does this first
    result = run_train(cfg.model, cfg.drafter, cfg.train, cfg.tracking, run_dir / "teacher", run_dir / "train")

Layout of `out_dir` (storage every worker shares):
    ray/train-<hash>/checkpoint_<step>/   Ray Train checkpoints: DeepSpeed files of every rank, rng_rank<r>.pt,
                                          meta.json (step, epoch, data position, config)
    train_log.jsonl                       one line per log step (a resumed run appends; last line per step wins)
    wandb/                                the W&B run (rank 0; offline by default)
    drafter/  drafter.safetensors (fp32, spec tensor names), arch.json, train_metrics.json -- written last

Resume: rerunning with the same inputs resumes from the latest checkpoint at the exact step and data
position (the Ray run is named after a hash of the inputs). max_steps stops early but does not rescale
the lr schedule (which spans the planned epochs), so a run stopped at max_steps=N and rerun with a larger
max_steps is step-for-step the same as one uninterrupted run. A finished drafter/ with the same inputs is
reused as is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline import atomic
from pipeline.config import ADDED_LATER, DrafterConfig, ModelConfig, TrackingConfig, TrainConfig, resolve_drafter
from pipeline.heads import arch_record, head_type
from pipeline.lineage import hash_json, hashed_settings
from pipeline.loss import add_stats, make_batch, position_metrics, position_weights
from pipeline.shards import read_shard

EXECUTION_ONLY = ("cpus_per_worker", "log_every", "checkpoint_every", "max_failures")  # do not change the result
DRAFTER_FILES = ("drafter.safetensors", "arch.json", "train_metrics.json")


def heldout_top1(drafter_dir: Path) -> list[float | None]:
    """A trained drafter's held-out top-1 agreement with the teacher per draft position 1 .. horizon - 1
    (train_metrics.json's `final`), None where the held-out set had none (or no metrics file)."""
    drafter_dir = Path(drafter_dir)
    path = drafter_dir / "train_metrics.json"
    final = json.loads(path.read_text()).get("final", {}) if path.is_file() else {}
    horizon = json.loads((drafter_dir / "arch.json").read_text())["horizon"]
    values = [final.get(f"heldout/top1_{i}") for i in range(1, horizon)]
    return [None if v is None or v != v else float(v) for v in values]  # nan: no held-out row reached it


class TeacherData:
    """One rank's view of the teacher shards: a deterministic held-out split of sequences, this rank's
    shards (rank-strided), a per-epoch seeded order, and batches addressed by global step (the data
    position), so resuming at step s reads exactly what the uninterrupted run read at step s."""

    def __init__(self, teacher_dir: Path, manifest: dict, batch_size: int, heldout_fraction: float, seed: int,
                 rank: int, world: int):
        self.dir, self.manifest, self.batch_size = Path(teacher_dir), manifest, batch_size
        self.seed, self.rank = seed, rank
        rows = [s["rows"] for s in manifest["shards"]]
        if len(rows) < world:
            raise ValueError(f"{len(rows)} teacher shards for {world} training workers: every worker reads whole "
                             "shards, so use fewer workers or a smaller teacher.shard_size")
        self.heldout: dict[int, list[int]] = {s: [] for s in range(len(rows))}
        for s, r in sorted(_heldout(rows, heldout_fraction, seed)):
            self.heldout[s].append(r)
        self.train_rows = {s: sorted(set(range(n)) - set(self.heldout[s])) for s, n in enumerate(rows)}
        per_rank = [sum(len(self.train_rows[s]) for s in range(r, len(rows), world)) for r in range(world)]
        self.my_shards = list(range(rank, len(rows), world))
        self.steps_per_epoch = min(per_rank) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"not enough training sequences: the smallest worker share has {min(per_rank)}, "
                             f"fewer than train.batch_size={batch_size}")
        dropped = sum(per_rank) - self.steps_per_epoch * batch_size * world
        if rank == 0 and dropped > 0.1 * sum(per_rank):
            warnings.warn(f"{dropped} of {sum(per_rank)} training sequences are skipped each epoch (uneven shards "
                          "across workers or a batch_size that does not divide them)")
        self._order: tuple[int, list] = (-1, [])
        self._cache: dict[int, list] = {}

    def _read(self, shard: int) -> list:
        if shard not in self._cache:
            if len(self._cache) >= 2:  # an epoch walks shard by shard: two are enough
                self._cache.pop(next(iter(self._cache)))
            m = self.manifest
            self._cache[shard] = read_shard(self.dir / "shards" / m["shards"][shard]["name"], m["hidden_size"],
                                            m["top_k"], m["hidden_dtype"])
        return self._cache[shard]

    def batch(self, step: int) -> list:
        epoch, b = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:  # shards in a seeded order, rows shuffled within each shard
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            order = [(int(s), int(r)) for s in rng.permutation(self.my_shards)
                     for r in rng.permutation(self.train_rows[int(s)])]
            self._order = (epoch, order)
        pairs = self._order[1][b * self.batch_size:(b + 1) * self.batch_size]
        return [self._read(s)[r] for s, r in pairs]

    def heldout_batches(self) -> list[list]:
        seqs = [self._read(s)[r] for s in self.my_shards for r in self.heldout[s]]
        return [seqs[i:i + self.batch_size] for i in range(0, len(seqs), self.batch_size)]


def _heldout(rows: list[int], fraction: float, seed: int) -> set[tuple[int, int]]:
    """(shard, row) pairs held out for evaluation: a seeded choice over all sequences, from the manifest alone."""
    total = sum(rows)
    n = int(round(total * fraction))
    n = max(n, 1) if fraction > 0 and total > 1 else n
    pick = np.random.default_rng([seed, 7]).choice(total, size=n, replace=False)
    offsets = np.cumsum([0] + rows)
    shard = np.searchsorted(offsets, pick, side="right") - 1
    return set(zip(shard.tolist(), (pick - offsets[shard]).tolist()))


def load_embedding_table(model_cfg: ModelConfig, output: bool = False) -> torch.Tensor:
    """The base model's (V, H) input embeddings in fp32 (output=True: its output embeddings, the lm_head
    that drafter.init=base_head starts from; the same table where they are tied). Reads only that tensor
    from a local safetensors checkpoint when it can find it (a 70B model is not loaded per worker); else
    loads the model."""
    from pipeline.base_model import input_embeddings, load_base_model, read_tensors, resolve_model_path

    path = Path(resolve_model_path(model_cfg))
    if path.is_dir():
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
        weight = (skeleton.get_output_embeddings() if output else skeleton.get_input_embeddings()).weight
        names = [n for n, p in skeleton.named_parameters(remove_duplicate=False) if p is weight]
        for name in names:  # one at a time: a tied output layer is the same table, read only if needed
            table = read_tensors(path, {name: name}).get(name)
            if table is not None and tuple(table.shape) == tuple(weight.shape):
                return table.float()
    model, _ = load_base_model(model_cfg)
    if output:
        return model.get_output_embeddings().weight.detach().float().cpu()
    return input_embeddings(model)


def check_schedule(train_cfg: TrainConfig, steps_per_epoch: int) -> None:
    """Warn about a warmup the run never finishes (the lr would never reach its peak)."""
    planned = train_cfg.max_steps or train_cfg.epochs * steps_per_epoch
    if train_cfg.warmup_steps >= planned:
        warnings.warn(f"train.warmup_steps={train_cfg.warmup_steps} >= the run's {planned} steps: the learning rate "
                      f"never reaches train.lr={train_cfg.lr}; lower warmup_steps")


def vocab_maps(d2t: torch.Tensor | None, vocab_size: int, device, objective: str) -> dict:
    """distill_loss keyword arguments: the objective and, for a draft vocabulary, its id maps."""
    if d2t is None:
        return {"objective": objective}
    t2d_V = torch.full((vocab_size,), -1, dtype=torch.long)
    t2d_V[d2t] = torch.arange(d2t.numel())
    return {"objective": objective, "t2d_V": t2d_V.to(device), "d2t": d2t.to(device)}


def draft_vocabulary(teacher_dir: Path, manifest: dict, n: int) -> dict:
    """The n most frequent tokens of the teacher responses (tokens[1:] of every sequence: what the
    drafter must predict) and their coverage of those tokens. Reads only the token column."""
    import pyarrow.parquet as pq

    from pipeline.drafter import select_draft_vocab

    if not n:
        return {"size": 0}
    counts = np.zeros(manifest["vocab_size"], dtype=np.int64)
    for shard in manifest["shards"]:
        column = pq.read_table(Path(teacher_dir) / "shards" / shard["name"], columns=["tokens"])["tokens"]
        responses = [np.asarray(seq[1:], dtype=np.int64) for seq in column.to_pylist()]
        if responses:
            counts += np.bincount(np.concatenate(responses), minlength=len(counts))
    d2t, coverage = select_draft_vocab(torch.from_numpy(counts), min(n, manifest["vocab_size"]),
                                       manifest["vocab_size"])
    return {"size": int(d2t.numel()), "coverage": coverage, "distinct_tokens": int((counts > 0).sum()),
            "d2t": d2t.tolist()}


def train_inputs(manifest: dict, drafter_cfg: DrafterConfig, train_cfg: TrainConfig, seed: int) -> dict:
    train = hashed_settings({k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in EXECUTION_ONLY},
                            ADDED_LATER["train"])
    # what the data IS, never when it was written: a repaired shard must not throw away training progress
    data = {k: v for k, v in manifest.items() if k != "created_at"}
    return {"teacher_manifest_hash": hash_json(data), "drafter": hashed_settings(dataclasses.asdict(drafter_cfg), ADDED_LATER["drafter"]),
            "train": train, "seed": seed}


def train_run_name(inputs: dict) -> str:
    """The Ray Train run of these inputs: same inputs -> same run -> resume from its checkpoints."""
    resumable = {**inputs, "train": {k: v for k, v in inputs["train"].items() if k != "max_steps"}}
    return f"train-{hash_json(resumable)[:12]}"


def latest_checkpoint_step(out_dir: Path, run_name: str) -> int | None:
    """The step of the newest checkpoint of `run_name` under out_dir that Ray Train registered, None without
    one. Ray Train lists a checkpoint in checkpoint_manager_snapshot.json only once it is whole in storage;
    a folder it was still copying when the disk filled up or the process died is not counted (Ray Train
    does not restore it either)."""
    run_dir = Path(out_dir) / "ray" / run_name
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        registered = {r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        registered = set()
    steps = [int(p.name.split("_")[-1]) for p in run_dir.glob("checkpoint_*")
             if p.name.split("_")[-1].isdigit() and p.name in registered]
    return max(steps, default=None)


def other_checkpoints(out_dir: Path, inputs: dict) -> list[dict]:
    """Ray Train runs under out_dir/ray made from other inputs than `inputs`, newest checkpoint each:
    {run_name, step, changed: [dotted input keys that differ], num_workers}. Their checkpoints are not used."""
    from pipeline.lineage import changed_keys

    found = []
    mine = train_run_name(inputs)
    for run in sorted((Path(out_dir) / "ray").glob("train-*")):
        step = latest_checkpoint_step(out_dir, run.name)
        if run.name == mine or step is None:
            continue
        meta_path = run / f"checkpoint_{step:07d}" / "meta.json"
        theirs = json.loads(meta_path.read_text()).get("inputs", {}) if meta_path.is_file() else {}
        changed = changed_keys(theirs, inputs, ("train.max_steps",))
        found.append({"run_name": run.name, "step": step, "changed": changed,
                      "num_workers": theirs.get("train", {}).get("num_workers")})
    return found


def world_size_conflict(out_dir: Path, inputs: dict, others: list[dict]) -> str | None:
    """A clear refusal when the only difference from existing checkpoints (`others`, from other_checkpoints)
    is train.num_workers: each worker reads its own shards, so another world size reads the data in another
    order and cannot continue them exactly. Never a silent restart from step 0."""
    for other in others:
        if other["changed"] == ["train.num_workers"]:
            path = Path(out_dir) / "ray" / other["run_name"]
            return (f"{path} holds a checkpoint at step {other['step']} of this same training with "
                    f"train.num_workers={other['num_workers']}, but this run asks for "
                    f"{inputs['train']['num_workers']}. Another world size reads the data in another order, so it "
                    f"cannot continue that run exactly. Rerun with train.num_workers={other['num_workers']} to resume "
                    f"from step {other['step']}, or delete {path} to start over from step 0.")
    return None


def _check_base_model(model_cfg: ModelConfig, drafter_cfg: DrafterConfig, manifest: dict) -> None:
    """The teacher data was made by this base model (sizes, tokenizer), so the drafter will fit it."""
    from transformers import AutoConfig

    from pipeline.base_model import check_vocab, load_tokenizer, resolve_model_path
    from pipeline.lineage import tokenizer_hash

    if drafter_cfg.horizon < 2:
        raise ValueError(f"drafter.horizon={drafter_cfg.horizon}: must be >= 2 (g0 + at least one draft token)")
    config = AutoConfig.from_pretrained(resolve_model_path(model_cfg), revision=model_cfg.revision or None,
                                        trust_remote_code=model_cfg.trust_remote_code).get_text_config()
    for key in ("hidden_size", "vocab_size"):
        if manifest[key] != getattr(config, key):
            raise ValueError(f"teacher data has {key}={manifest[key]} but base model {model_cfg.base_model!r} has "
                             f"{getattr(config, key)}: the drafter would not match the base model it serves")
    tokenizer = load_tokenizer(model_cfg)
    check_vocab(tokenizer, config.vocab_size, model_cfg.base_model)
    if manifest.get("tokenizer_hash") and manifest["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise ValueError(f"teacher data was made with a different tokenizer than {model_cfg.base_model!r}'s: "
                         "the drafter's vocabulary would not match the base model's")


def run_train(model_cfg: ModelConfig, drafter_cfg: DrafterConfig, train_cfg: TrainConfig,
              tracking_cfg: TrackingConfig, teacher_dir: Path, out_dir: Path, seed: int = 0, wandb_group: str = "",
              wandb_dir: Path | None = None) -> dict:
    """Train (or resume, or reuse) the drafter; returns train_metrics.json's content. Expects Ray initialized.
    The W&B run goes under `wandb_dir` (default out_dir)/wandb."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.teacher import load_manifest, verify_shards

    teacher_dir, out_dir = Path(teacher_dir).resolve(), Path(out_dir).resolve()
    manifest = load_manifest(teacher_dir)
    drafter_cfg = resolve_drafter(drafter_cfg, manifest["vocab_size"])
    _check_base_model(model_cfg, drafter_cfg, manifest)
    inputs = train_inputs(manifest, drafter_cfg, train_cfg, seed)
    drafter_dir = out_dir / "drafter"
    done = drafter_dir / "train_metrics.json"
    # checked before reusing anything too: a drafter is only as good as the shards it was trained on
    problems = verify_shards(teacher_dir)
    if problems:
        raise ValueError("teacher shards are damaged; rerun the teacher stage:\n  " + "\n  ".join(problems))
    if all((drafter_dir / f).is_file() for f in DRAFTER_FILES) and json.loads(done.read_text())["inputs"] == inputs:
        print(f"train: reusing the trained drafter in {drafter_dir} (same teacher data and config)")
        return {**json.loads(done.read_text()), "drafter_dir": str(drafter_dir)}
    others = other_checkpoints(out_dir, inputs)
    conflict = world_size_conflict(out_dir, inputs, others)
    if conflict:
        raise ValueError(conflict)
    for other in others:
        print(f"train: not using the checkpoint at step {other['step']} in ray/{other['run_name']}: it was made "
              f"from other inputs ({', '.join(other['changed'][:5]) or 'unknown'})", flush=True)
    data = TeacherData(teacher_dir, manifest, train_cfg.batch_size, train_cfg.heldout_fraction, seed, 0,
                       train_cfg.num_workers)  # raises on a data/worker mismatch before any worker starts
    check_schedule(train_cfg, data.steps_per_epoch)
    draft_vocab = draft_vocabulary(teacher_dir, manifest, drafter_cfg.draft_vocab_size)
    if draft_vocab["size"]:
        print(f"train: draft vocabulary of {draft_vocab['size']} tokens covers {100 * draft_vocab['coverage']:.2f}% "
              f"of the teacher's response tokens ({draft_vocab['distinct_tokens']} distinct)", flush=True)
    run_name = train_run_name(inputs)
    loop_config = {"model_cfg": model_cfg, "drafter_cfg": drafter_cfg, "train_cfg": train_cfg,
                   "tracking_cfg": tracking_cfg, "teacher_dir": str(teacher_dir), "out_dir": str(out_dir),
                   "wandb_dir": str(wandb_dir or out_dir), "seed": seed, "wandb_group": wandb_group,
                   "inputs": inputs, "run_name": run_name, "manifest": manifest, "draft_vocab": draft_vocab}
    # Ray 2.60 Train v2 tees a worker's print() to its logger AND to Ray's wrapped stdout: every line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # propagated to the workers by Ray Train
    trainer = TorchTrainer(
        train_worker, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                               resources_per_worker={"CPU": train_cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=run_name, storage_path=str(out_dir / "ray"),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures)),
    )
    try:
        trainer.fit()  # a failed worker: Ray Train restarts the group from the last checkpoint, max_failures times
    except Exception as e:  # noqa: BLE001 - Ray Train wraps the workers' errors; say how to resume
        step = latest_checkpoint_step(out_dir, run_name)
        where = f"from the checkpoint at step {step}" if step is not None else "from step 0 (no checkpoint yet)"
        raise RuntimeError(f"training failed after {train_cfg.max_failures} restart(s) of the worker group: "
                           f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}. Rerunning the same "
                           f"command resumes {where}") from e
    if not done.is_file():
        raise RuntimeError(f"training finished but {done} was not written")
    return {**json.loads(done.read_text()), "drafter_dir": str(drafter_dir)}


def _quiet_worker_logs() -> None:
    """The console shows our own log lines, not Ray Train's per-step `Reporting training result ...
    TrainingReport(...)` dicts (logged at INFO by every rank) nor torch's deprecation notice from inside
    DeepSpeed's all-gather; Ray keeps every worker's full log under its session directory."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context  # its logger is named by file

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: its logging is left as it is
        pass
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def build_drafter(model_cfg: ModelConfig, dc: DrafterConfig, vocab_size: int, hidden_size: int, seed: int,
                  d2t: torch.Tensor | None):
    """(head type, arch, drafter) as every training worker builds them (the estimate too), from the base model's
    embedding table (and its read-out under drafter.init=base_head); `d2t` is the draft vocabulary or None."""
    head = head_type(dc.head)
    arch = head.make_arch(vocab_size, hidden_size, dc)
    base_head = load_embedding_table(model_cfg, output=True) if dc.init == "base_head" else None
    return head, arch, head.build(arch, load_embedding_table(model_cfg), seed, d2t, base_head=base_head)


def train_step(engine, head, seqs: list, K: int, weights: torch.Tensor, maps: dict, anchors: str):
    """One optimizer step of the DeepSpeed `engine` on these teacher sequences: (loss, stats, batch)."""
    batch = {k: v.to(engine.device) for k, v in make_batch(seqs, K).items()}
    loss, stats = head.loss(engine, training_anchors(batch, anchors), weights, maps)
    engine.backward(loss)
    engine.step()
    return loss, stats, batch


def train_worker(config: dict) -> None:
    """Body of every Ray Train worker (Ray Train already set up the process group)."""
    import ray.train

    from pipeline.distributed import full_state_dict, init_engine
    from pipeline.tracking import NullRun, open_run

    _quiet_worker_logs()
    tc, dc, manifest = config["train_cfg"], config["drafter_cfg"], config["manifest"]
    seed, out_dir = config["seed"], Path(config["out_dir"])
    torch.set_num_threads(tc.cpus_per_worker)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()

    data = TeacherData(Path(config["teacher_dir"]), manifest, tc.batch_size, tc.heldout_fraction, seed, rank, world)
    planned = tc.epochs * data.steps_per_epoch
    stop = tc.max_steps or planned
    d2t = torch.tensor(config["draft_vocab"]["d2t"]) if dc.draft_vocab_size else None
    head, arch, drafter = build_drafter(config["model_cfg"], dc, manifest["vocab_size"], manifest["hidden_size"], seed,
                                        d2t)
    engine = init_engine(drafter, tc, world, total_steps=max(planned, stop))  # max_steps does not rescale the lr
    K, weights = arch.horizon - 1, position_weights(arch.horizon - 1, tc.position_weight_decay)
    maps = vocab_maps(d2t, arch.vocab_size, engine.device, tc.objective)
    start = _resume(engine, data.steps_per_epoch, stop)

    group = config["wandb_group"]
    run = (open_run(config["tracking_cfg"], Path(config["wandb_dir"]), name=f"{group or 'draftforge'}-train",
                    job_type="train", group=group,
                    config={"train": dataclasses.asdict(tc), "drafter": arch.to_dict(), "inputs": config["inputs"]})
           if rank == 0 else NullRun())
    log = StepLogger(run, out_dir / "train_log.jsonl" if rank == 0 else None)
    meta = {"run_name": config["run_name"], "inputs": config["inputs"]}
    window, t0, metrics, last_ckpt = None, time.time(), {}, start
    for step in range(start, stop):
        lr = engine.get_lr()[0]  # the lr of this step (engine.step moves the schedule on)
        loss, stats, batch = train_step(engine, head, data.batch(step), K, weights, maps, tc.anchors)
        extra = torch.tensor([loss.item(), batch["h_NH"].shape[0], batch["num_tokens"].item(), 1.0])
        window = add_stats(window, {**stats, "extra": extra.to(engine.device)})
        done = step + 1
        if done % tc.log_every == 0 or done == stop:
            metrics = _window_metrics(window, time.time() - t0, lr, done, data.steps_per_epoch)
            log.log(metrics, done, stop)
            window, t0 = None, time.time()
        if done == stop:
            break  # the final checkpoint comes with the held-out metrics
        if done % tc.checkpoint_every == 0:
            _checkpoint(engine, done, data.steps_per_epoch, metrics, meta)
            last_ckpt = done
        elif done % tc.log_every == 0:
            ray.train.report(metrics)  # every rank reports the same number of times: it is a barrier

    heldout = evaluate(engine, head, data, K, weights, maps)
    metrics = {**metrics, **heldout, "step": stop}
    if last_ckpt != stop:
        _checkpoint(engine, stop, data.steps_per_epoch, metrics, meta)
    state = full_state_dict(engine)  # every rank: a collective under ZeRO-3
    if rank == 0:
        _write_drafter(out_dir / "drafter", state, head, arch, {"inputs": config["inputs"], "steps": stop,
                                                            "final": metrics, "run_name": config["run_name"],
                                                            "base_model_hash": manifest.get("base_model_hash"),
                                                            "draft_vocab": {k: v for k, v in config["draft_vocab"].items()
                                                                            if k != "d2t"}})
        print(f"train: wrote {out_dir / 'drafter'}; held-out " +
              " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in heldout.items()), flush=True)
        import resource

        shards_dir = Path(config["teacher_dir"]) / "shards"
        data_mb = sum((shards_dir / s["name"]).stat().st_size for s in manifest["shards"]) / 1e6
        print(f"train: worker peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB with "
              f"{data_mb:.0f} MB of teacher shards (a worker holds two shards at a time, plus its held-out rows)",
              flush=True)
    run.summary.update(metrics)
    run.finish()


def _resume(engine, steps_per_epoch: int, stop: int) -> int:
    """Restore the latest Ray Train checkpoint of this run, if any; returns the step to continue from."""
    import ray.train

    from pipeline.distributed import load_checkpoint

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as ckpt_dir:
        state = load_checkpoint(engine, Path(ckpt_dir))
    if state["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(f"checkpoint has steps_per_epoch={state['steps_per_epoch']}, the data gives "
                         f"{steps_per_epoch}: not the same run; use a new output directory")
    if state["step"] > stop:
        raise ValueError(f"the latest checkpoint is at step {state['step']}, past max_steps={stop}")
    if engine.global_rank == 0:
        print(f"train: resuming from step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})",
              flush=True)
    return state["step"]


def _window_metrics(window: dict, seconds: float, lr: float, step: int, steps_per_epoch: int) -> dict:
    """Sum the window's per-rank sums over ranks, then turn them into means and rates."""
    import torch.distributed as dist

    keys = sorted(window)
    flat = torch.cat([window[k].flatten().float() for k in keys])
    dist.all_reduce(flat)
    summed = dict(zip(keys, flat.cpu().split([window[k].numel() for k in keys])))
    loss_sum, anchors, tokens, rank_steps = summed.pop("extra").tolist()
    return {"train/loss": loss_sum / rank_steps, "train/lr": lr, "train/epoch": step / steps_per_epoch,
            "train/anchors_per_s": anchors / seconds, "train/tokens_per_s": tokens / seconds,
            **position_metrics(summed, "train/")}


def training_anchors(batch: dict, anchors: str) -> dict:
    """The batch the loss sees under `train.anchors`: every anchor, or only the on-policy ones (pipeline/loss.py
    make_batch: the fed tokens are the teacher's own greedy path), the others masked out."""
    if anchors == "all":
        return batch
    if anchors == "on_policy":
        return {**batch, "mask_NK": batch["mask_NK"] & batch["on_policy_NK"]}
    raise ValueError(f"train.anchors must be all or on_policy, got {anchors!r}")


@torch.no_grad()
def evaluate(engine, head, data: TeacherData, K: int, weights: torch.Tensor, maps: dict | None = None) -> dict:
    """Per-position KL and top-1 agreement on the held-out sequences, summed over ranks, on every anchor and
    on the on-policy ones (`heldout/on_policy_top1_i`, with their share `heldout/on_policy_share_i`): with
    corpus replies those are the contexts greedy decoding reaches. Every rank runs the same number of forwards
    (ZeRO-3 forwards are collective); a rank with fewer batches pads with a fully masked one."""
    import torch.distributed as dist

    batches = data.heldout_batches()
    count = torch.tensor([len(batches)], device=engine.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    if count.item() == 0:
        return {}
    total = None
    for i in range(int(count.item())):
        seqs = batches[i] if i < len(batches) else data.batch(0)[:1]
        batch = {k: v.to(engine.device) for k, v in make_batch(seqs, K).items()}
        if i >= len(batches):
            batch["mask_NK"] = torch.zeros_like(batch["mask_NK"])  # padding: counts nothing
        _, stats = head.loss(engine, batch, weights, maps or {})  # one forward: its stats hold the on-policy sums too
        total = add_stats(total, stats)
    keys = sorted(total)
    flat = torch.cat([total[k].float() for k in keys])
    dist.all_reduce(flat)
    total = dict(zip(keys, flat.cpu().split([total[k].numel() for k in keys])))
    out = position_metrics(total, "heldout/")
    kl_K = total["kl_sum_K"] / total["count_K"].clamp_min(1)
    present = (total["count_K"] > 0).float() * weights
    out["heldout/kl"] = float((present * kl_K).sum() / present.sum().clamp_min(1e-12))
    out["heldout/anchors"] = float(total["count_K"][0])
    on_policy_count = total["on_policy_count_K"]
    for i, (hits, n, all_n) in enumerate(zip(total["on_policy_top1_sum_K"].tolist(), on_policy_count.tolist(),
                                             total["count_K"].tolist())):
        out[f"heldout/on_policy_top1_{i + 1}"] = hits / n if n else float("nan")
        out[f"heldout/on_policy_share_{i + 1}"] = n / all_n if all_n else float("nan")
    return out


def _checkpoint(engine, step: int, steps_per_epoch: int, metrics: dict, meta: dict) -> None:
    """Every rank writes its DeepSpeed files into a local temp dir; Ray Train merges them into one
    checkpoint folder in the run's storage (all ranks report: this is also a barrier)."""
    import ray.train

    from pipeline.distributed import save_checkpoint

    epoch, batch_in_epoch = divmod(step, steps_per_epoch)
    client_state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "steps_per_epoch": steps_per_epoch}
    with tempfile.TemporaryDirectory(prefix="draftforge-ckpt-") as tmp:
        save_checkpoint(engine, Path(tmp), client_state, meta=meta)
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:07d}")


def _write_drafter(out: Path, state: dict, head, arch, train_metrics: dict) -> None:
    """drafter.safetensors + arch.json + train_metrics.json, renamed into place so `out` is whole or absent."""
    from safetensors.torch import save_file

    from pipeline.export import check_state_dict

    check_state_dict(state, arch)  # the spec's tensor names and shapes
    with atomic.replacing_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "drafter.safetensors"))
        (tmp / "arch.json").write_text(json.dumps(arch_record(head, arch), indent=2) + "\n")
        (tmp / "train_metrics.json").write_text(json.dumps(train_metrics, indent=2, default=str) + "\n")


class StepLogger:
    """Rank 0: W&B, a line in train_log.jsonl and a progress line per log step. Elsewhere (no path, a
    NullRun): nothing -- so the train loop logs unconditionally."""

    def __init__(self, run, path: Path | None):
        self.run, self.path = run, path

    def log(self, metrics: dict, step: int, stop: int) -> None:
        self.run.log(metrics, step=step)
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        print(f"train step {step}/{stop} loss {metrics['train/loss']:.4f} kl_1 {metrics['train/kl_1']:.3f} "
              f"top1_1 {metrics['train/top1_1']:.3f} lr {metrics['train/lr']:.2e} "
              f"{metrics['train/anchors_per_s']:.0f} anchors/s {metrics['train/tokens_per_s']:.0f} tokens/s",
              flush=True)
