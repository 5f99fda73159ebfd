"""How long a run's stages will take on this machine, timed before anything runs.

    python -m pipeline.main recipe=smollm2 --estimate                  # minutes per stage; the recipe's
                                                                       # run.budget_min: the data it would take
    python -m pipeline.main recipe=tiny --estimate --budget-min 60     # whether a run fits an hour

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
- train: the run's training workers side by side, each a process of its own with the drafter and the
  DeepSpeed engine built as a training worker builds them (pipeline/train.py build_drafter, init_engine,
  train_step) on a gloo group, on `train.cpus_per_worker` threads, trained for a few timed steps of
  `train.batch_size` sequences sampled from the teacher records above -> seconds per step, all-reduce and
  the workers' share of the cores included; the step count is the stage's own (epochs x sequences per
  worker / batch size). Then one held-out forward and one checkpoint, times the stage's count of each.
- eval: plain greedy decoding and each training-free baseline on `eval.batch_size` eval prompts for up to
  32 new tokens -> seconds per new token of each; the drafter's methods (redrafter, hybrid, incumbent)
  are counted at plain decoding's cost, since the drafter does not exist yet. Every method decodes
  every eval prompt once per repeat plus one warm-up batch, on the linear-layer kernels the eval will run
  (`eval.cpu_kernels`; auto times both and keeps the faster, as the eval does). The eval's fixed costs (kernel and beam-length timing, turn-2 answers,
  the profile) are not timed.

What no stage times (Ray's start-up, the model loads, the training workers' start, Ray Train's copies of the
checkpoints, the eval's kernel and beam-length timing and its profile) is a fixed allowance of 3 minutes, measured
beside the timed stages on a 2-core CPU. A stage the plan
reuses costs nothing. The figures are what this machine measures now: on a busy machine they
are slower than a quiet run would be.

run.budget_min (`choose_budget_limit`, called by pipeline/main.py when a fresh teacher stage starts, and by
--estimate): the same timings, with each scaling stage's `cost` of the first n training prompts, searched for
the most prompts up to data.train.limit whose run fits BUDGET_AIM of the budget (`fitting_count`); that count
maps back to a data.train.limit through the loader's order (`limit_for`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.plan import REUSE, StagePlan

SAMPLE_TOKENS = 32  # new tokens per timed decode (generation in the teacher, every method in the eval)
TRAIN_STEPS = 8  # timed training steps, after one untimed


@dataclass
class StageEstimate:
    stage: str
    seconds: float
    detail: str
    scales_with_prompts: bool  # teacher and train grow with data.train.limit; the eval does not
    count: int = 0  # teacher: positions to record (an upper bound for generated replies); train: steps; eval: decodes
    # teacher and train: the stage's seconds for the first n of the run's training prompts (n up to all of them),
    # counted as for all of them (the actors' shards and batches, the training split), at the rates timed here
    cost: Callable[[int], float] | None = dataclasses.field(default=None, repr=False, compare=False)


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


def estimate_teacher(cfg: Config, tokenizer) -> tuple[StageEstimate, list, list[int]]:
    """The teacher stage's seconds, the timed sample's records (the training estimate's data) and the length
    of every training prompt's record, one per prompt as the teacher stage filters them (pipeline/teacher.py
    training_prompts): exact with corpus replies, the upper bound max_new_tokens + 1 with generated ones."""
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

    def shards_of(n: int) -> list[list[dict]]:  # the shards of the first n prompts (limit n takes those)
        return [items[start:start + size] for start in range(0, n, size)]

    shards = shards_of(len(items))
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

        def all_padded(n: int) -> int:  # the padded tokens of every batch the actors run for the first n prompts
            return sum(padded([sh[i] for i in batch]) for sh in shards_of(n) for batch in worker.batches(sh))

        def cost(n: int) -> float:
            return all_padded(n) * seconds / padded(sample) / actors

        lengths = [len(reply(p)) + 1 for p in items]  # a record holds the reply and the position before it
        positions = sum(lengths)
        total = cost(len(items))
        what = f"{positions:,} positions ({len(items):,} prompts' replies), {all_padded(len(items)):,} padded tokens"
    else:
        points, records = _generation_timings(worker, shard)

        def cost(n: int) -> float:
            return _generated_teacher_seconds(worker, points, shards_of(n), cfg.teacher.max_new_tokens) / actors

        total = cost(len(items))
        lengths = [cfg.teacher.max_new_tokens + 1] * len(items)
        positions = sum(lengths)
        what = f"at most {positions:,} positions ({len(items):,} prompts x {cfg.teacher.max_new_tokens} new tokens)"
    return (StageEstimate("teacher", total, f"{what}: {positions / total / actors:,.0f}/s per actor x {actors} "
                                            "actor(s)", True,
                          positions, cost), records, lengths)


def _generation_timings(worker, shard: list[dict]) -> tuple[list, list]:
    """The timings of a shard's batches with the shortest and the longest prompts, and their records (below).

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
    return points, records


def _generated_teacher_seconds(worker, points: list, shards: list[list[dict]], max_new_tokens: int) -> float:
    """Seconds for these shards' batches with generated replies, on the lines through the timed `points`."""
    return sum(generated_batch_seconds(points, len(batch) * max(len(p["input_ids"]) for p in batch), len(batch),
                                       max_new_tokens)
               for each in shards for batch in ([each[i] for i in indices] for indices in worker.batches(each)))


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


@dataclass(frozen=True)
class TrainTiming:
    """One training worker's timings (`_time_training_worker`), in seconds."""

    step_s: float  # the mean optimizer step, all-reduce included
    heldout_s: float  # one held-out forward (no gradient) over a batch
    checkpoint_s: float  # one DeepSpeed checkpoint written to local disk


def sized_batch(records: list, lengths: list[int], batch_size: int, rng: random.Random) -> list:
    """`batch_size` teacher sequences whose lengths are drawn from the stage's `lengths`, each a sampled record
    that long or longer, cut to that length (its first positions: a valid record). A step's time follows its
    tokens, and not linearly (2 workers of SmolLM2's drafter on a 2-core AMD EPYC: 0.20 s per step of 1
    sequence, 0.42 s of 4, 1.29 s of 8), so the timed batches take the stage's own mix of lengths, not the
    sample's (one length-sorted teacher batch)."""
    out = []
    for n in rng.choices(lengths, k=batch_size):
        long_enough = [r for r in records if len(r.tokens) >= n] or [max(records, key=lambda r: len(r.tokens))]
        r = rng.choice(long_enough)
        n = min(n, len(r.tokens))
        out.append(dataclasses.replace(r, tokens=r.tokens[:n], hidden=r.hidden[:n], topk_ids=r.topk_ids[:n],
                                       topk_logprobs=r.topk_logprobs[:n], tail_logprob=r.tail_logprob[:n]))
    return out


def _time_training_worker(rank: int, world: int, port: int, cfg: Config, records: list, lengths: list[int], d2t,
                          vocab_size: int, hidden_size: int, out) -> None:
    """The body of one timing process: a training worker's drafter and DeepSpeed engine, built as
    pipeline/train.py train_worker builds them, on a gloo group of `world` processes side by side, timed over
    TRAIN_STEPS steps (`sized_batch`) after a warm-up step, then a held-out forward and a checkpoint."""
    import datetime
    import os
    import tempfile
    import warnings

    import torch.distributed as dist

    from pipeline.distributed import init_engine, save_checkpoint
    from pipeline.loss import make_batch, position_weights
    from pipeline.train import _quiet_worker_logs, build_drafter, train_step, vocab_maps

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    warnings.filterwarnings("ignore")
    _quiet_worker_logs()
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    try:
        tc = cfg.train
        head, arch, drafter = build_drafter(cfg.model, cfg.drafter, vocab_size, hidden_size, cfg.run.seed, d2t)
        engine = init_engine(drafter, tc, world, total_steps=1000)
        K = arch.horizon - 1
        weights = position_weights(K, tc.position_weight_decay)
        maps = vocab_maps(d2t, arch.vocab_size, engine.device, tc.objective)
        rng = random.Random(cfg.run.seed * 1000 + rank)

        def step():
            train_step(engine, head, sized_batch(records, lengths, tc.batch_size, rng), K, weights, maps, tc.anchors)

        step()  # warm-up, untimed
        per_step = sum(_timed(step)[0] for _ in range(TRAIN_STEPS)) / TRAIN_STEPS  # a mean: the steps differ
        with torch.no_grad():
            batch = make_batch(sized_batch(records, lengths, tc.batch_size, rng), K)
            heldout, _ = _timed(lambda: head.loss(engine, batch, weights, maps))
        with tempfile.TemporaryDirectory(prefix="draftforge-estimate-") as tmp:
            checkpoint, _ = _timed(lambda: save_checkpoint(engine, Path(tmp), {"step": 0}))
        dist.barrier()
        if rank == 0:
            out.put(TrainTiming(per_step, heldout, checkpoint))
    finally:
        dist.destroy_process_group()


def heldout_batches_per_worker(cfg: Config, num_sequences: int) -> int:
    """The held-out forwards every training worker runs at the end (pipeline/train.py evaluate: the most any
    worker has, the others pad)."""
    data = training_split(cfg, num_sequences)
    world, shards = max(1, cfg.train.num_workers), len(data.heldout)
    return max(math.ceil(sum(len(data.heldout[s]) for s in range(r, shards, world)) / cfg.train.batch_size)
               for r in range(world))


def checkpoints_written(cfg: Config, steps: int) -> int:
    """Checkpoints the training stage writes over `steps` steps: every train.checkpoint_every, and the last."""
    return (steps - 1) // cfg.train.checkpoint_every + 1 if steps else 0


def estimate_train(cfg: Config, records: list, lengths: list[int]) -> StageEstimate:
    """The training stage on the teacher sample's `records`, for the stage's sequences of these `lengths`."""
    import torch.multiprocessing as mp

    from pipeline.config import resolve_drafter
    from pipeline.main import free_port
    from pipeline.train import load_embedding_table

    embed = load_embedding_table(cfg.model)
    vocab_size, hidden_size = embed.shape
    cfg = dataclasses.replace(cfg, drafter=resolve_drafter(cfg.drafter, vocab_size))
    d2t = None
    if cfg.drafter.draft_vocab_size:  # the most frequent tokens of the sample, then the lowest other ids
        seen = torch.cat([torch.as_tensor(r.tokens) for r in records]).bincount(minlength=vocab_size)
        d2t = seen.argsort(descending=True, stable=True)[:min(cfg.drafter.draft_vocab_size, vocab_size)].sort().values
    # the workers side by side in processes of their own: their all-reduces and their share of the cores are
    # part of a step's time (two workers on 2 cores: 0.42 s per step against 0.31 s for one alone, AMD EPYC)
    world = max(1, cfg.train.num_workers)
    context = mp.get_context("spawn")
    out = context.SimpleQueue()
    port = free_port()
    procs = [context.Process(target=_time_training_worker,
                             args=(rank, world, port, cfg, records, lengths, d2t, vocab_size, hidden_size, out))
             for rank in range(world)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):  # one that fails leaves the others waiting on it: stop them
        procs[0].join(0.2)
        if any(p.exitcode for p in procs):
            for p in procs:
                p.terminate()
    for p in procs:
        p.join()
    if out.empty() or any(p.exitcode for p in procs):
        raise RuntimeError(f"--estimate: the {world} timed training process(es) failed (exit codes "
                           f"{[p.exitcode for p in procs]}); their output is above")
    timing: TrainTiming = out.get()

    def cost(n: int) -> float:  # the first n prompts' sequences; too few for the split: never fits
        try:
            steps = train_steps(cfg, n)
        except ValueError:
            return math.inf
        return (steps * timing.step_s + checkpoints_written(cfg, steps) * timing.checkpoint_s
                + heldout_batches_per_worker(cfg, n) * timing.heldout_s)

    steps = train_steps(cfg, len(lengths))
    checkpoints = checkpoints_written(cfg, steps)
    heldout = heldout_batches_per_worker(cfg, len(lengths))
    total = cost(len(lengths))
    return StageEstimate("train", total,
                         f"{steps:,} steps x {timing.step_s:.2f} s ({world} DeepSpeed worker(s) side by side, "
                         f"{cfg.train.batch_size} sequences each, {cfg.train.precision}) + {checkpoints} checkpoints x "
                         f"{timing.checkpoint_s:.2f} s + {heldout} held-out batches x {timing.heldout_s:.2f} s",
                         True, steps, cost)


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
            teacher, records, lengths = estimate_teacher(cfg, tokenizer)
            prompts = len(lengths)
            if "teacher" in todo:
                out.append(teacher)
            if "train" in todo:
                out.append(estimate_train(cfg, records, lengths))
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


def fitting_count(estimates: list[StageEstimate], prompts: int, budget_s: float) -> int:
    """The most of the first `prompts` training prompts whose stages fit `budget_s`, each scaling stage at its
    own `cost` (the actors' batches and the training split of exactly those prompts, not a straight line), the
    others as timed; 0 when none fits (nor when too few prompts for the training split would)."""
    fixed = sum(e.seconds for e in estimates if not e.scales_with_prompts)

    def total(n: int) -> float:
        return fixed + sum(e.cost(n) for e in estimates if e.scales_with_prompts)

    if total(prompts) <= budget_s:
        return prompts
    low, high = 0, prompts  # the fewest prompts training can split: every count from there costs more
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if math.isfinite(total(mid)) else (mid, high)
    if total(high) > budget_s:
        return 0
    low = high  # fits; prompts does not
    high = prompts
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if total(mid) <= budget_s else (low, mid)
    return low


def limit_for(cfg: Config, tokenizer, n: int) -> int:
    """The data.train.limit whose training prompts are the first n of this config's (pipeline/teacher.py
    training_prompts): the limit counts prompts as the loader keeps them, before the prompts that are also
    eval prompts and those with no corpus reply are removed, so it is the loader's position of the n-th kept."""
    from data.prompts import load_prompt_set
    from pipeline.teacher import training_prompts

    kept, _ = training_prompts(cfg.data, tokenizer, cfg.teacher.responses, quiet=True)  # the estimate said it
    loaded, _ = load_prompt_set(cfg.data.train, tokenizer, cfg.data.max_prompt_tokens, cfg.data.chat_template)
    if not 0 < n <= len(kept):
        raise ValueError(f"limit_for: {n} of {len(kept)} training prompts")
    last = kept[n - 1]
    for i, p in enumerate(loaded):
        if p is last or (p.id, p.text) == (last.id, last.text):
            return i + 1
    raise ValueError(f"training prompt {last.id!r} is not among the loaded prompts")


# The share of run.budget_min a run sized to it aims at: this estimate ran 9-25% under the real stages in the
# checks against real runs (README, "--estimate"), and the machines here change speed by as much within an hour
BUDGET_AIM = 0.85


@dataclass(frozen=True)
class BudgetChoice:
    """What a run sized to its time budget (run.budget_min) chose, kept in its run directory (budget.json)."""

    budget_min: float
    most: int  # data.train.limit as configured: the most it may take
    limit: int  # data.train.limit chosen
    prompts: int  # the training prompts that limit gives
    minutes: dict  # stage -> estimated minutes at that limit, and "elapsed" before the choice

    def line(self, chose: str = "chose") -> str:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in self.minutes.items())
        return (f"budget: run.budget_min={self.budget_min:g} {chose} data.train.limit={self.limit} of at most "
                f"{self.most} ({self.prompts} training prompts), the most whose run fits {BUDGET_AIM:.0%} of it on "
                f"this machine (estimated minutes: {stages}, start-up {STARTUP_S / 60:.1f})")


def choose_budget_limit(cfg: Config, tokenizer, estimates: list[StageEstimate], prompts: int,
                        started: float) -> BudgetChoice:
    """The most training prompts, up to the configured data.train.limit (`prompts` of them), whose run fits
    BUDGET_AIM of run.budget_min from `started` (time.perf_counter() when the run began: the timing of the
    `estimates`, from `estimate_run`, is spent from it too); ValueError when not even the eval fits."""
    elapsed_s = time.perf_counter() - started
    budget_s = cfg.run.budget_min * 60 * BUDGET_AIM - elapsed_s - STARTUP_S
    n = fitting_count(estimates, prompts, budget_s)
    if n == 0:
        raise ValueError(f"run.budget_min={cfg.run.budget_min:g}: no training data fits it on this machine:\n"
                         + report(estimates, prompts, cfg.run.budget_min) + "\nraise run.budget_min, or lower "
                         "eval.num_prompts or eval.max_new_tokens")
    minutes = {e.stage: (e.cost(n) if e.scales_with_prompts else e.seconds) / 60 for e in estimates}
    return BudgetChoice(cfg.run.budget_min, cfg.data.train.limit, limit_for(cfg, tokenizer, n), n,
                        {**minutes, "elapsed": elapsed_s / 60})


# What no stage times: Ray's start-up, the model loads in the driver and in every actor and worker, the training
# workers' start, Ray Train's copies of the checkpoints, the eval's kernel and beam-length timing and its profile. 3 minutes
# beside the timed stages in a scaled-down recipe=smollm2 on a 2-core AMD EPYC (README, "--estimate")
STARTUP_S = 180.0


def report(estimates: list[StageEstimate], prompts: int, budget_min: float | None, of: str = "") -> str:
    """The estimate's lines; `of` says what the figures are for when that is not the run as configured."""
    lines = [f"estimate on this machine (timed just now{'; ' + of if of else ''}; docs: pipeline/estimate.py):"]
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
