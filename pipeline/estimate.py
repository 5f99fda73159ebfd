"""How long a run's stages will take on this machine, timed before anything runs.

    python -m pipeline.main recipe=smollm2 --dry-run --estimate                 # minutes per stage
    python -m pipeline.main recipe=smollm2 --dry-run --estimate --budget-min 60 # and what fits an hour

The recipes are sized for one CPU, and the same recipe took 51 minutes on one 2-core machine of this
repo's pool and would take well over an hour on another (README: "What it reaches"). So the dry run can
time the run's own code on small samples, with the run's model, settings and thread counts, and scale:

- teacher: `TeacherWorker.records` (what an actor does per shard, minus the write) over one batch of
  training prompts, cut from a shard as an actor cuts it, drawn with the run's seed. With corpus replies
  the time per padded token (batch x longest prompt + reply) of that batch, times the padded tokens of
  every batch the actors will run (exact counts). With generated replies, the shard's batches with the
  shortest and the longest prompts, each timed in parts (prefill, decoding steps on replies of at most
  32 tokens, the record), give each part as a line in a batch's padded prompt tokens, applied to every
  batch the actors will run as if every reply ran its full `teacher.max_new_tokens` (an upper bound).
  Actors run side by side.
- train: a drafter of the run's shape, built as a training worker builds it, trained for a few timed
  steps of `train.batch_size` sampled sequences (the teacher records above) with the run's loss, AdamW and
  precision on `train.cpus_per_worker` threads -> seconds per step; the step count is the stage's own
  (epochs x sequences per worker / batch size). Workers run side by side; their gradient all-reduce,
  DeepSpeed and the checkpoints are not timed.
- eval: plain greedy decoding and each training-free baseline on `eval.batch_size` eval prompts for up to
  32 new tokens -> seconds per new token of each; the drafter's methods (redrafter, hybrid, incumbent)
  are counted at plain decoding's cost, since the drafter does not exist yet. Every method decodes
  every eval prompt once per repeat plus one warm-up batch, on torch's stock kernels (`eval.cpu_kernels=auto`
  only ever picks a faster kernel). The eval's fixed costs (kernel and beam-length timing, turn-2 answers,
  the profile) are not timed.

What no stage times (Ray's start-up, the model loads, the training workers' start, DeepSpeed, checkpoints,
the eval's kernel and beam-length timing and its profile) is a fixed allowance of 3 minutes, measured
beside the timed stages on a 2-core CPU. A stage the plan
reuses costs nothing. The figures are what this machine measures now: on a busy machine they
are slower than a quiet run would be.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.plan import REUSE, StagePlan

SAMPLE_TOKENS = 32  # new tokens per timed decode (generation in the teacher, every method in the eval)
TRAIN_STEPS = 3  # timed training steps, after one untimed


@dataclass
class StageEstimate:
    stage: str
    seconds: float
    detail: str
    scales_with_prompts: bool  # teacher and train grow with data.train.limit; the eval does not
    count: int = 0  # teacher: positions to record (an upper bound for generated replies); train: steps; eval: decodes


def estimate_problem(cfg: Config) -> str | None:
    """None when this machine can time the run's stages, else why not (GPU runs: use --plan)."""
    if cfg.eval.device != "cpu" or cfg.teacher.gpus_per_actor or cfg.teacher.stages > 1:
        return ("--estimate times the stages on this machine's CPU; this run uses GPUs or a split teacher "
                "(use --plan for a cluster's resource plan)")
    return None


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def estimate_teacher(cfg: Config, tokenizer) -> tuple[StageEstimate, list, int]:
    """The teacher stage's seconds, the timed sample's records (the training estimate's data) and the
    number of training prompts (as the teacher stage filters them: pipeline/teacher.py training_prompts)."""
    from pipeline.teacher import TeacherWorker, cut_response, training_prompts

    train_prompts, _ = training_prompts(cfg.data, tokenizer, cfg.teacher.responses)

    corpus = cfg.teacher.responses == "corpus"
    teacher_cfg = cfg.teacher if corpus else dataclasses.replace(cfg.teacher, max_new_tokens=min(cfg.teacher.max_new_tokens,
                                                                                   SAMPLE_TOKENS))
    worker = TeacherWorker(cfg.model, teacher_cfg, "/nonexistent", tokenizer.eos_token_id, tokenizer.pad_token_id,
                           cfg.run.seed)
    items = [{"id": p.id, "input_ids": p.input_ids, **({"reply_ids": p.reply_ids} if corpus else {})}
             for p in train_prompts]
    # one batch as an actor makes them: a shard of teacher.shard_size prompts in the teacher's order, cut into
    # length-sorted batches
    rng = random.Random(cfg.run.seed)
    size = cfg.teacher.shard_size
    shards = [items[start:start + size] for start in range(0, len(items), size)]
    shard = rng.choice(shards)
    worker.records(shard[:2])  # warm-up, untimed
    actors = max(1, cfg.teacher.num_actors)
    if corpus:
        sample = [shard[i] for i in rng.choice(worker.batches(shard))]
        seconds, records = _timed(lambda: worker.records(sample))
        # A recording pass is one forward over the batch padded to its longest prompt + reply, and its time
        # follows those padded tokens, whatever the batch (SmolLM2, 2-core AMD EPYC: 3.6-4.0 ms per padded
        # token over batches whose recorded positions per second ranged 74-199); so the sample's cost per
        # padded token times the padded tokens of every batch the actors will run.
        def reply(p):
            return cut_response(p["reply_ids"], worker.eos_ids, cfg.teacher.max_new_tokens)

        def padded(batch: list[dict]) -> int:
            return len(batch) * max(len(p["input_ids"]) + len(reply(p)) for p in batch)

        all_padded = sum(padded([sh[i] for i in batch]) for sh in shards for batch in worker.batches(sh))
        positions = sum(len(reply(p)) + 1 for p in items)
        total = all_padded * seconds / padded(sample) / actors
        what = f"{positions:,} positions ({len(items):,} prompts' replies), {all_padded:,} padded tokens"
    else:
        seconds, records = _generated_teacher_seconds(worker, shard, shards, cfg.teacher.max_new_tokens)
        total = seconds / actors
        positions = len(items) * (cfg.teacher.max_new_tokens + 1)
        what = f"at most {positions:,} positions ({len(items):,} prompts x {cfg.teacher.max_new_tokens} new tokens)"
    return (StageEstimate("teacher", total, f"{what}: {positions / total / actors:,.0f}/s per actor x {actors} "
                                            "actor(s)", True,
                          positions), records, len(items))


def _generated_teacher_seconds(worker, shard: list[dict], shards: list[list[dict]],
                               max_new_tokens: int) -> tuple[float, list]:
    """Seconds for the actors' batches with generated replies, and the records of the timed samples.

    A batch generates (a prefill over its left-padded prompts, then one decoding step per new token whose
    attention reads every cached token) and is then recorded (one forward over prompt + reply, padded). On
    real chat prompts the prompts' lengths decide most of a batch's time (SmolLM2 in bf16, 2-core AMD EPYC,
    batches of 16, 64 new tokens: 4 s to generate and 1 s to record with 41-token prompts; 13 s and 8 s with
    500-token ones, a decoding step 0.05 s against 0.11 s), so one batch's rate of recorded positions
    misjudged the stage by 2x either way. So the shard's batches with the shortest and the longest prompts
    are each timed in three parts: generation of 1 new token (the prefill), of SAMPLE_TOKENS (their
    difference: the decoding steps) and the record. Each part is a straight line in a batch's padded prompt
    tokens through those two points, and every batch of every shard costs its prefill + max_new_tokens steps
    + its record on those lines: an upper bound, as if no reply ended early."""
    cfg = worker.cfg

    def generate(sample: list[dict], new_tokens: int):
        worker.cfg = dataclasses.replace(cfg, max_new_tokens=new_tokens)
        try:
            return _timed(lambda: worker.responses(sample))
        finally:
            worker.cfg = cfg

    def padded_prompts(batch: list[dict]) -> int:
        return len(batch) * max(len(p["input_ids"]) for p in batch)

    batches = worker.batches(shard)  # sorted by prompt length
    points, records = [], []
    for indices in {tuple(batches[0]): None, tuple(batches[-1]): None}:  # one batch when the shard has one
        sample = [shard[i] for i in indices]
        t_prefill, _ = generate(sample, 1)
        t_long, replies = generate(sample, cfg.max_new_tokens)
        steps = max(1, max(map(len, replies)) - 1)
        chunk = {"prompt_ids": [p["id"] for p in sample], "prompts": [p["input_ids"] for p in sample],
                 "responses": replies}
        t_record, [recs] = _timed(lambda chunk=chunk: worker.batch_records([chunk]))
        records += recs
        # the record's time per padded token of prompt + reply, at the reply's full max_new_tokens later
        per_record = t_record / (len(sample) * max(len(p["input_ids"]) + len(r) for p, r in zip(sample, replies)))
        points.append(GenerationTiming(padded_prompts(sample), t_prefill, max(0.0, t_long - t_prefill) / steps,
                                       per_record))
    total = sum(generated_batch_seconds(points, padded_prompts(batch := [each[i] for i in indices]), len(batch),
                                        max_new_tokens)
                for each in shards for indices in worker.batches(each))
    return total, records


@dataclass(frozen=True)
class GenerationTiming:
    """One timed teacher batch with generated replies (`_generated_teacher_seconds`)."""

    padded_prompt_tokens: int  # batch size x its longest prompt
    prefill_s: float  # generating 1 new token
    step_s: float  # each further decoding step
    record_s_per_token: float  # the record's forward, per padded token of prompt + reply


def generated_batch_seconds(points: list[GenerationTiming], padded_prompt_tokens: int, batch_size: int,
                            max_new_tokens: int) -> float:
    """A batch's seconds with generated replies at full length: prefill + (max_new_tokens - 1) steps + the record
    over its padded prompt + max_new_tokens, each part on the line through the first and last timed batches in
    padded prompt tokens (never below 0); with one timed batch, the prefill scales with the tokens and the
    rest is taken as it is."""
    first, last = points[0], points[-1]

    def part(name: str) -> float:
        a, b = getattr(first, name), getattr(last, name)
        x0, x1 = first.padded_prompt_tokens, last.padded_prompt_tokens
        if x1 == x0:
            return a * padded_prompt_tokens / x0 if name == "prefill_s" else a
        return max(0.0, a + (b - a) * (padded_prompt_tokens - x0) / (x1 - x0))

    return (part("prefill_s") + (max_new_tokens - 1) * part("step_s")
            + (padded_prompt_tokens + batch_size * max_new_tokens) * part("record_s_per_token"))


def training_split(cfg: Config, num_sequences: int):
    """The split the training stage will make of this many teacher sequences (pipeline/train.py TeacherData
    over shards of teacher.shard_size rows: held-out rows aside, whole shards per worker, batches of
    train.batch_size), computed without the data; ValueError where the training stage would refuse it."""
    import warnings

    from pipeline.train import TeacherData

    size = cfg.teacher.shard_size
    shards = [{"rows": min(size, num_sequences - start)} for start in range(0, num_sequences, size)]
    with warnings.catch_warnings():  # the training stage warns about skipped sequences itself
        warnings.simplefilter("ignore")
        return TeacherData(Path("/nonexistent"), {"shards": shards}, cfg.train.batch_size,
                           cfg.train.heldout_fraction, cfg.run.seed, 0, max(1, cfg.train.num_workers))


def train_steps(cfg: Config, num_sequences: int) -> int:
    """The training stage's step count for this many teacher sequences (ValueError where it would refuse)."""
    data = training_split(cfg, num_sequences)
    return cfg.train.max_steps or cfg.train.epochs * data.steps_per_epoch


def estimate_train(cfg: Config, records: list, num_sequences: int) -> StageEstimate:
    from pipeline.config import resolve_drafter
    from pipeline.heads import head_type
    from pipeline.loss import make_batch, position_weights
    from pipeline.train import load_embedding_table, vocab_maps

    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))  # estimate_run restores the caller's
    embed = load_embedding_table(cfg.model)
    dc = resolve_drafter(cfg.drafter, embed.shape[0])
    head = head_type(dc.head)
    arch = head.make_arch(embed.shape[0], embed.shape[1], dc)
    d2t = None
    if arch.draft_vocab_size:  # the most frequent tokens of the sample, then the lowest other ids
        seen = torch.cat([torch.as_tensor(r.tokens) for r in records]).bincount(minlength=arch.vocab_size)
        d2t = seen.argsort(descending=True, stable=True)[:arch.draft_vocab_size].sort().values
    base_head = load_embedding_table(cfg.model, output=True) if dc.init == "base_head" else None
    drafter = head.build(arch, embed, cfg.run.seed, d2t, base_head=base_head)
    if cfg.train.precision == "bf16":
        drafter = drafter.to(torch.bfloat16)
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    K = arch.horizon - 1
    weights = position_weights(K, cfg.train.position_weight_decay)
    maps = vocab_maps(d2t, arch.vocab_size, "cpu", cfg.train.objective)
    rng = random.Random(cfg.run.seed)

    def step():
        batch = make_batch(rng.choices(records, k=cfg.train.batch_size), K)
        loss, _ = head.loss(drafter, batch, weights, maps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up, untimed
    per_step = sorted(_timed(step)[0] for _ in range(TRAIN_STEPS))[TRAIN_STEPS // 2]
    steps = train_steps(cfg, num_sequences)
    return StageEstimate("train", steps * per_step,
                         f"{steps:,} steps x {per_step:.2f} s ({cfg.train.num_workers} worker(s) side by side, "
                         f"{cfg.train.batch_size} sequences each, {cfg.train.precision})", True, steps)


def estimate_eval(cfg: Config, eval_prompts: list, eos: int | None) -> StageEstimate:
    from eval.baselines import lookahead_generate, prompt_lookup_generate
    from eval.decoder import plain_greedy
    from pipeline.base_model import load_base_model

    if cfg.eval.num_threads:  # estimate_run restores the caller's
        torch.set_num_threads(cfg.eval.num_threads)
    model, _ = load_base_model(cfg.model, dtype=cfg.eval.dtype)
    on = ""
    if cfg.eval.device == "cpu":  # the linear layers the eval will run (auto times both kernels, as the eval does)
        from eval.cpu_kernels import apply_cpu_kernels

        on = f" on {apply_cpu_kernels(model, cfg.eval.cpu_kernels)['kernels']} kernels"
    n = min(cfg.eval.max_new_tokens, SAMPLE_TOKENS)
    batch = [p.input_ids for p in eval_prompts[:cfg.eval.batch_size]]
    decoders = {"plain": lambda: plain_greedy(model, batch, n, eos)}
    baselines = {"prompt_lookup": prompt_lookup_generate, "lookahead": lookahead_generate}
    for name in cfg.eval.baselines:
        if name in baselines:
            decoders[name] = lambda f=baselines[name]: f(model, batch, n, eos)
    per_token = {}
    for name, decode in decoders.items():
        decode()  # warm-up, untimed
        seconds, result = _timed(decode)
        per_token[name] = seconds / max(1, max(len(t) for t in result.tokens))
    drafted = ["redrafter"] + (["hybrid"] if cfg.eval.hybrid_ngram else [])
    costs = {**{m: per_token["plain"] for m in drafted}, **per_token}
    batches = math.ceil(len(eval_prompts) / cfg.eval.batch_size)
    passes = cfg.eval.repeats * batches + 1  # every repeat decodes every batch; one warm-up batch
    total = passes * cfg.eval.max_new_tokens * sum(costs.values())
    rates = ", ".join(f"{m} {cfg.eval.batch_size / s:.1f}" for m, s in per_token.items())
    return StageEstimate("eval", total, f"{len(costs)} methods x {passes} batch decodes x {cfg.eval.max_new_tokens} "
                                        f"new tokens; tokens/s{on}: {rates} ({', '.join(drafted)} at plain's)", False,
                         passes * len(costs))


def estimate_run(cfg: Config, tokenizer, eval_prompts: list | None,
                 plans: list[StagePlan]) -> tuple[list[StageEstimate], int]:
    """The stages this run will run (not the ones it reuses), timed on this machine, and the number of
    training prompts (0 when neither teacher nor train runs)."""
    todo = {p.stage for p in plans if p.action != REUSE}
    out, prompts = [], 0
    threads = torch.get_num_threads()  # each stage's timing sets its own thread count
    try:
        if "teacher" in todo or "train" in todo:  # training is timed on the teacher sample's records
            teacher, records, prompts = estimate_teacher(cfg, tokenizer)
            if "teacher" in todo:
                out.append(teacher)
            if "train" in todo:
                out.append(estimate_train(cfg, records, prompts))
        if "eval" in todo and eval_prompts:
            out.append(estimate_eval(cfg, eval_prompts, tokenizer.eos_token_id))
    finally:
        torch.set_num_threads(threads)
    return out, prompts


def fitting_limit(estimates: list[StageEstimate], prompts: int, budget_s: float, fixed_s: float) -> int:
    """The most training prompts whose stages fit `budget_s` with the ones that do not scale and `fixed_s`
    of start-up, assuming teacher and train scale linearly with the prompt count; 0 when nothing fits."""
    scaling = sum(e.seconds for e in estimates if e.scales_with_prompts)
    left = budget_s - fixed_s - sum(e.seconds for e in estimates if not e.scales_with_prompts)
    if left <= 0:
        return 0
    if scaling <= 0:
        return prompts
    return int(prompts * left / scaling)


# What no stage times: Ray's start-up, the model loads in the driver and in every actor and worker, the training
# workers' start, DeepSpeed and checkpoints, the eval's kernel and beam-length timing and its profile. 3 minutes
# beside the timed stages in a scaled-down recipe=smollm2 on a 2-core AMD EPYC (README, "--estimate")
STARTUP_S = 180.0


def report(estimates: list[StageEstimate], prompts: int, budget_min: float | None) -> str:
    lines = ["estimate on this machine (timed just now; docs: pipeline/estimate.py):"]
    for e in estimates:
        lines.append(f"  {e.stage:<8}{e.seconds / 60:7.1f} min  {e.detail}")
    total = sum(e.seconds for e in estimates) + STARTUP_S
    lines.append(f"  {'total':<8}{total / 60:7.1f} min  (with {STARTUP_S / 60:.1f} min for start-up and what no stage times)")
    if budget_min is not None:
        limit = fitting_limit(estimates, prompts, budget_min * 60, STARTUP_S)
        if total <= budget_min * 60:
            lines.append(f"  fits the budget of {budget_min:g} min")
            if prompts and limit > prompts:  # the teacher could record more in the same hour
                lines.append(f"  the budget would take about data.train.limit={limit} ({limit / prompts:.1f}x the "
                             f"{prompts} prompts, teacher and train scaled linearly: an extrapolation, so estimate "
                             "again at that limit, which times its own prompts)")
        else:
            scaling = any(e.scales_with_prompts for e in estimates)
            if limit and scaling:
                lines.append(f"  over the budget of {budget_min:g} min: data.train.limit={limit} (of {prompts} "
                             "prompts) would fit")
            else:
                lines.append(f"  over the budget of {budget_min:g} min even without training data: lower "
                             "eval.num_prompts or eval.max_new_tokens")
    return "\n".join(lines)
