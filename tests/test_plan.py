"""The stage plan (pipeline/plan.py): a dry run says what each stage will do with the outputs already in
the run directory (reused / will resume / will run / REFUSED and why), and a real run checks the same
before Ray starts or anything in the run directory is overwritten.

    python -m pytest tests/test_plan.py -q
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest

import pipeline.main as pm
from pipeline.config import load_config
from pipeline.plan import REFUSED, RESUME, REUSE, RUN, plan_stages

pytestmark = pytest.mark.usefixtures("ray_free")  # pipeline.main runs in this process, with its own Ray


def _argv(model_dir, out_dir, *extra):
    return ["recipe=tiny", f"model.base_model={model_dir}", f"run.output_dir={out_dir}", "run.name=r",
            "tracking.mode=disabled", "run.num_cpus=2", "data.train.limit=6", "teacher.max_new_tokens=4",
            "teacher.shard_size=2", "teacher.num_actors=1", "data.max_prompt_tokens=4096",
            "train.batch_size=1", *extra]  # 6 teacher sequences are too few for the recipe's batches of 8


@pytest.fixture(scope="module")
def teacher_run(tiny_model_dir, tmp_path_factory):
    """A run directory whose teacher stage finished (3 shards), made through the real pipeline command."""
    import ray

    out = tmp_path_factory.mktemp("plan")
    try:
        assert pm.main(_argv(tiny_model_dir, out, "run.stages=[teacher]")) == 0
    finally:
        ray.shutdown()
    return out


def _plan(model_dir, out, *extra):
    cfg = load_config(_argv(model_dir, out, *extra))
    return {p.stage: p for p in plan_stages(cfg, pm.run_dir_of(cfg))}


def test_finished_teacher_is_reused_and_later_stages_will_run(teacher_run, tiny_model_dir, capsys):
    plan = _plan(tiny_model_dir, teacher_run)
    assert plan["teacher"].action == REUSE and "3 shards verified" in plan["teacher"].detail
    assert plan["train"].action == RUN and plan["eval"].action == RUN
    # the teacher's 6 sequences are too few for the recipe's 2 workers x train.batch_size=8: the dry run says so
    assert pm.main(_argv(tiny_model_dir, teacher_run, "run.stages=[teacher,train]", "train.batch_size=8",
                         "--dry-run")) == 2
    assert "the training stage would refuse the teacher's 6 sequences" in capsys.readouterr().err
    assert pm.main(_argv(tiny_model_dir, teacher_run, "run.stages=[teacher,train]", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "stage teacher: reused (3 shards verified" in out and "stage train: will run" in out


def test_other_base_model_is_refused_by_the_dry_run_and_before_the_real_run_writes(teacher_run, tiny_model_dir,
                                                                                   tmp_path, capsys):
    from tests.conftest import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    resolved = teacher_run / "r" / "resolved_config.yaml"
    before = resolved.read_bytes()
    assert pm.main(_argv(other, teacher_run, "run.stages=[teacher,train]", "--dry-run")) == 2
    captured = capsys.readouterr()
    assert "stage teacher: REFUSED (its data was made from other inputs: base_model_hash" in captured.out
    assert "would be refused" in captured.err
    # the real run: refused before Ray or any write (its eval stage is left out: HumanEval prompts do not fit
    # this tiny model's 512 positions, which preflight would refuse first)
    assert pm.main(_argv(other, teacher_run, "run.stages=[teacher,train]")) == 2
    err = capsys.readouterr().err
    assert "stage teacher: REFUSED" in err and "Nothing was written" in err
    assert resolved.read_bytes() == before
    import ray

    assert not ray.is_initialized()


def test_damaged_or_unfinished_teacher_data_will_resume(teacher_run, tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(teacher_run, copy)
    shard = sorted((copy / "r" / "teacher" / "shards").glob("*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    plan = _plan(tiny_model_dir, copy)
    assert plan["teacher"].action == RESUME and "1 damaged shard(s)" in plan["teacher"].detail
    (copy / "r" / "teacher" / "manifest.json").unlink()
    journal = copy / "r" / "teacher" / "progress.jsonl"
    journal.write_text(journal.read_text().splitlines()[0] + "\n")
    plan = _plan(tiny_model_dir, copy)
    assert plan["teacher"].action == RESUME and "1 of 3 shards journaled" in plan["teacher"].detail
    assert plan["train"].action == RUN


def register(checkpoint) -> None:
    """Add `checkpoint` to its run's checkpoint_manager_snapshot.json, as Ray Train does once it is whole."""
    snapshot = checkpoint.parent / "checkpoint_manager_snapshot.json"
    state = json.loads(snapshot.read_text()) if snapshot.is_file() else {"checkpoint_results": []}
    state["checkpoint_results"].append({"checkpoint_dir_name": checkpoint.name, "metrics": {}})
    snapshot.write_text(json.dumps(state))


def test_train_reuse_resume_and_unused_checkpoints(teacher_run, tiny_model_dir, tmp_path):
    from pipeline.teacher import load_manifest
    from pipeline.train import DRAFTER_FILES, train_inputs, train_run_name

    copy = tmp_path / "copy"
    shutil.copytree(teacher_run, copy)
    cfg = load_config(_argv(tiny_model_dir, copy))
    train_dir = copy / "r" / "train"
    inputs = train_inputs(load_manifest(copy / "r" / "teacher"), cfg.drafter, cfg.train, cfg.run.seed)
    old = train_dir / "ray" / "train-0123456789ab" / "checkpoint_0000007"
    old.mkdir(parents=True)
    register(old)
    (old / "meta.json").write_text(json.dumps({"step": 7, "inputs": {**inputs, "train": {**inputs["train"], "lr": 9.0}}}))
    plan = _plan(tiny_model_dir, copy)
    assert plan["train"].action == RUN and plan["train"].detail == \
        "from step 0; the checkpoint at step 7 in ray/train-0123456789ab is not used (other train.lr)"
    # the same training on another world size: refused with how to proceed, never a silent step 0
    other_world = {**inputs, "train": {**inputs["train"], "num_workers": 1}}
    (old / "meta.json").write_text(json.dumps({"step": 7, "inputs": other_world}))
    plan = _plan(tiny_model_dir, copy)
    assert plan["train"].action == REFUSED
    assert "train.num_workers=1" in plan["train"].detail and "resume from step 7" in plan["train"].detail
    from pipeline.train import run_train  # the stage itself refuses too, before any worker starts

    with pytest.raises(ValueError, match="Rerun with train.num_workers=1 to resume from step 7"):
        run_train(cfg.model, cfg.drafter, cfg.train, cfg.tracking, copy / "r" / "teacher", train_dir)
    mine = train_dir / "ray" / train_run_name(inputs)
    (mine / "checkpoint_0000020").mkdir(parents=True)
    register(mine / "checkpoint_0000020")
    plan = _plan(tiny_model_dir, copy)
    assert plan["train"].action == RESUME and "step 20" in plan["train"].detail
    # a later folder Ray Train never registered (its copy was cut short by a full disk or a kill) is not
    # resumed from: neither the plan nor Ray Train itself trusts it
    (mine / "checkpoint_0000040").mkdir()
    plan = _plan(tiny_model_dir, copy)
    assert plan["train"].action == RESUME and "step 20" in plan["train"].detail
    drafter = train_dir / "drafter"
    drafter.mkdir()
    for name in DRAFTER_FILES:
        (drafter / name).write_text("{}")
    (drafter / "train_metrics.json").write_text(json.dumps({"inputs": inputs}))
    plan = _plan(tiny_model_dir, copy)
    assert plan["train"].action == REUSE and plan["eval"].action == RUN
    plan = _plan(tiny_model_dir, copy, "train.lr=0.5")  # another setting: that drafter is not reused
    assert plan["train"].action == RUN and plan["train"].detail.startswith("from step 0")
    assert plan["eval"].action == RUN


def test_eval_alone_without_a_drafter_is_refused(tiny_model_dir, tmp_path):
    plan = _plan(tiny_model_dir, tmp_path, "run.stages=[eval]")
    assert plan["eval"].action == REFUSED and "no trained drafter" in plan["eval"].detail


def test_a_second_run_on_the_same_directory_refuses(tiny_model_dir, tmp_path, capsys):
    """Two runs pointed at one run directory: the second gets a clear error and writes nothing."""
    lock = pm.lock_run_dir(tmp_path / "r")  # the first run holds the lock
    try:
        assert pm.main(_argv(tiny_model_dir, tmp_path, "run.stages=[teacher,train]")) == 2
        err = capsys.readouterr().err
        assert "is in use by another run (pid" in err and "use another run.name" in err
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [".lock"]
    finally:
        lock.close()
    import ray

    assert not ray.is_initialized()


def test_a_torn_eval_record_is_never_trusted(tmp_path):
    """An eval killed while writing its record: the rerun redoes the eval instead of reading half a record."""
    from eval.evaluate import finished_record

    (tmp_path / "eval_record.json").write_text('{"inputs_hash": "abc", "tokens_per_st')
    assert finished_record(tmp_path, {"x": 1}) is None


def test_repaired_teacher_data_keeps_the_training_inputs(teacher_run):
    """A shard regenerated byte-identically rewrites manifest.json with a new created_at: the training inputs
    (and so the Ray run that holds the checkpoints) must not change, or all training progress is lost."""
    from pipeline.config import DrafterConfig, TrainConfig
    from pipeline.teacher import load_manifest
    from pipeline.train import train_inputs, train_run_name

    manifest = load_manifest(teacher_run / "r" / "teacher")
    repaired = {**manifest, "created_at": "2099-01-01T00:00:00+00:00"}
    a = train_inputs(manifest, DrafterConfig(), TrainConfig(), 0)
    assert a == train_inputs(repaired, DrafterConfig(), TrainConfig(), 0) and train_run_name(a) == train_run_name(
        train_inputs(repaired, DrafterConfig(), TrainConfig(), 0))
    other = {**manifest, "shards": manifest["shards"][:-1]}  # what the data IS does count
    assert train_inputs(other, DrafterConfig(), TrainConfig(), 0) != a


# --- the estimate (--estimate, pipeline/estimate.py): the stages' work timed on this machine ---

def _minutes(out: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
            if line.startswith("  ") and len(line.split()) > 2 and line.split()[2] == "min"}


def test_estimate_times_the_stages_a_run_will_run_and_skips_the_reused_teacher(teacher_run, tiny_model_dir, tmp_path,
                                                                               capsys):
    from pipeline import estimate as est
    from pipeline.base_model import load_tokenizer
    from pipeline.train import TeacherData

    eval_file = tmp_path / "eval.jsonl"  # short eval prompts: the tiny model has 512 positions
    eval_file.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n"
                                 for i, p in enumerate(["def add(a, b):\n", "class Stack:\n", "for i in range(3):\n"])))
    extra = (f"data.eval.path={eval_file}", "data.eval.split=train", "eval.num_prompts=3", "eval.max_new_tokens=8",
             "train.epochs=2", "train.num_workers=1", "train.batch_size=2")
    # a fresh directory: all three stages, each timed; the budget line says whether it fits
    fresh = tmp_path / "fresh"
    assert pm.main(_argv(tiny_model_dir, fresh, *extra, "--estimate", "--budget-min", "600")) == 0
    out = capsys.readouterr().out
    minutes = _minutes(out)
    assert set(minutes) == {"teacher", "train", "eval", "total"}, out
    assert minutes["total"] >= 3.0 and "fits the budget of 600 min" in out  # the total counts 3 min of start-up
    # the eval is timed on the kernels the eval will run: auto times both, as the eval does, and says which won
    assert "cpu kernels (auto):" in out and re.search(r"tokens/s on (stock|onednn) kernels: plain", out), out
    assert "dry run: nothing was run" in out and not fresh.exists()  # an estimate writes nothing
    # the teacher already ran there: reused, so not timed; train and eval are. Two training workers: two
    # timing processes side by side on a gloo group, as the stage runs them
    cfg = load_config(_argv(tiny_model_dir, teacher_run, *extra, "train.num_workers=2", "train.batch_size=1"))
    plans = plan_stages(cfg, pm.run_dir_of(cfg))
    estimates, prompts = est.estimate_run(cfg, load_tokenizer(cfg.model), None, plans)
    by_stage = {e.stage: e for e in estimates}
    assert set(by_stage) == {"train"} and prompts == 6  # no eval prompts given: no eval estimate
    assert by_stage["train"].seconds > 0 and "2 DeepSpeed worker(s) side by side" in by_stage["train"].detail
    # the counts are the real run's: the teacher recorded at most the positions the estimate bounds
    # (generated replies), and the training stage's own split gives the estimate's steps, checkpoints and
    # held-out forwards (the most any worker has)
    manifest = json.loads((teacher_run / "r" / "teacher" / "manifest.json").read_text())
    teacher, _, lengths = est.estimate_teacher(cfg, load_tokenizer(cfg.model))
    assert manifest["num_tokens"] + manifest["num_sequences"] <= teacher.count == sum(lengths) == 6 * (4 + 1)
    ranks = [TeacherData(teacher_run / "r" / "teacher", manifest, 1, cfg.train.heldout_fraction, cfg.run.seed, rank, 2)
             for rank in range(2)]
    assert by_stage["train"].count == 2 * ranks[0].steps_per_epoch > 0
    heldout = max(len(r.heldout_batches()) for r in ranks)
    assert heldout > 0 and est.heldout_batches_per_worker(cfg, 6) == heldout
    assert f"+ {heldout} held-out batches" in by_stage["train"].detail
    assert f"+ {est.checkpoints_written(cfg, by_stage['train'].count)} checkpoints" in by_stage["train"].detail


def test_the_training_estimate_times_batches_of_the_stage_s_lengths_and_counts_its_checkpoints():
    """A step's time follows its tokens, so the timed batches take the stage's mix of sequence lengths: records
    cut to lengths drawn from the stage's, each still a whole record of its first positions."""
    import random

    import numpy as np

    from pipeline.config import Config, TrainConfig
    from pipeline.estimate import checkpoints_written, sized_batch
    from pipeline.shards import TeacherSequence

    def record(n, tag):
        return TeacherSequence(f"p{tag}", 3, np.arange(n, dtype=np.int32) + tag, np.full((n, 2), tag, np.float16),
                               np.zeros((n, 4), np.int32), np.zeros((n, 4), np.float32), np.zeros(n, np.float32))

    records = [record(10, 0), record(40, 1), record(257, 2)]
    rng = random.Random(0)
    batches = [sized_batch(records, [5, 30, 200], 4, rng) for _ in range(50)]
    seqs = [s for b in batches for s in b]
    assert all(len(b) == 4 for b in batches)
    assert {len(s.tokens) for s in seqs} == {5, 30, 200}  # every drawn length, and only those
    for s in seqs:  # the first positions of a record at least that long
        tag = int(s.hidden[0, 0])
        assert len(records[tag].tokens) >= len(s.tokens) and s.tokens[0] == tag
        assert s.hidden.shape == (len(s.tokens), 2) and s.topk_ids.shape[0] == s.tail_logprob.shape[0] == len(s.tokens)
    assert all(int(s.hidden[0, 0]) == 2 for s in seqs if len(s.tokens) == 200)  # only the long record is long enough
    # a length longer than every record: the longest, whole
    assert [len(s.tokens) for s in sized_batch(records, [999], 2, rng)] == [257, 257]
    # checkpoints: every checkpoint_every steps and the last (pipeline/train.py train_worker)
    cfg = Config(train=TrainConfig(checkpoint_every=200))
    assert [checkpoints_written(cfg, n) for n in (0, 1, 199, 200, 201, 400, 492)] == [0, 1, 1, 1, 2, 2, 3]


def test_generated_replies_are_estimated_per_batch_from_the_shortest_and_longest_timed_prompts():
    """With generated replies a batch's time follows its padded prompt tokens (prefill, decoding steps that
    read the cache, the record): each part lies on the line through the two timed batches."""
    from pipeline.estimate import GenerationTiming, generated_batch_seconds

    short = GenerationTiming(padded_prompt_tokens=100, prefill_s=1.0, step_s=0.05, record_s_per_token=0.001)
    long = GenerationTiming(padded_prompt_tokens=900, prefill_s=9.0, step_s=0.13, record_s_per_token=0.002)
    # a timed batch costs its own parts: prefill + 63 more steps + the record over 100 + 4 x 64 tokens
    assert generated_batch_seconds([short, long], 100, 4, 64) == pytest.approx(1.0 + 63 * 0.05 + 356 * 0.001)
    assert generated_batch_seconds([short, long], 900, 4, 64) == pytest.approx(9.0 + 63 * 0.13 + 1156 * 0.002)
    # halfway between them, every part is halfway
    assert generated_batch_seconds([short, long], 500, 4, 64) == pytest.approx(5.0 + 63 * 0.09 + 756 * 0.0015)
    # longer replies cost more steps and more recorded tokens; no part goes below zero far below the line
    assert generated_batch_seconds([short, long], 100, 4, 128) > generated_batch_seconds([short, long], 100, 4, 64)
    assert generated_batch_seconds([long, short], 0, 4, 1) >= 0.0
    # one timed batch (a shard of one batch): the prefill scales with the prompt tokens, the rest is as timed
    assert generated_batch_seconds([short], 300, 4, 1) == pytest.approx(3.0 + 1 * 300 * 0.001 + 4 * 0.001)


def test_an_estimate_over_budget_names_the_limit_that_fits(capsys):
    from pipeline.estimate import StageEstimate, fitting_limit, report

    stages = [StageEstimate("teacher", 1800, "", True), StageEstimate("train", 600, "", True),
              StageEstimate("eval", 1200, "", False)]
    # 60 min = 60 s start-up + 1200 s eval + 2340 s for data: 1000 prompts x 2340 / 2400
    assert fitting_limit(stages, 1000, 3600, 60) == 975
    assert fitting_limit(stages, 1000, 1200, 60) == 0  # the eval alone is over
    text = report(stages, 1000, 60)
    # 3600 s - 180 s of start-up - 1200 s of eval = 2220 s for data: 1000 prompts x 2220 / 2400
    assert "total      63.0 min" in text and "data.train.limit=925 (of 1000 prompts) would fit" in text
    assert "lower eval.num_prompts" in report(stages, 1000, 20)
    under = report(stages, 1000, 90)
    # under the budget it says how much data the rest would buy: 5400 - 180 - 1200 s = 4020 s for data
    assert "fits the budget of 90 min" in under and "data.train.limit=1675 (1.7x the 1000 prompts" in under
    assert "data.train.limit" not in report(stages[2:], 1000, 90)  # nothing scales with the prompts


def test_estimate_refusals(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pm.main(_argv(tiny_model_dir, tmp_path, "--budget-min", "60"))  # without --estimate
    assert e.value.code == 2 and "--budget-min needs --estimate" in capsys.readouterr().err
    from pipeline.estimate import estimate_problem

    cfg = load_config(_argv(tiny_model_dir, tmp_path))
    assert estimate_problem(cfg) is None
    for change in ({"eval": dataclasses.replace(cfg.eval, device="cuda")},
                   {"teacher": dataclasses.replace(cfg.teacher, gpus_per_actor=1)}):
        assert "use --plan" in estimate_problem(dataclasses.replace(cfg, **change))


# --- run.budget_min: the data sized to the time a run may take, timed when a fresh teacher starts ---

def test_the_most_prompts_that_fit_a_budget_follow_each_stage_s_own_cost():
    import math

    from pipeline.estimate import StageEstimate, fitting_count

    def stages(train_from: int):
        teacher = StageEstimate("teacher", 0, "", True, cost=lambda n: 2.0 * n)
        train = StageEstimate("train", 0, "", True, cost=lambda n: math.inf if n < train_from else 10 + n)
        return [teacher, train, StageEstimate("eval", 100, "", False)]

    # 100 s of eval + 10 s + 3 s per prompt: 500 s fit 130 prompts
    assert fitting_count(stages(1), 1000, 500) == 130
    assert fitting_count(stages(1), 100, 500) == 100  # all of them fit
    assert fitting_count(stages(1), 1000, 100) == 0  # the eval alone fills it
    # too few prompts for the training split never fit, however cheap
    assert fitting_count(stages(140), 1000, 500) == 0
    assert fitting_count(stages(20), 1000, 500) == 130


def test_a_limit_counts_prompts_as_the_loader_keeps_them_before_the_eval_overlap_is_removed(tiny_model_dir,
                                                                                              tmp_path):
    from pipeline.base_model import load_tokenizer
    from pipeline.estimate import limit_for
    from pipeline.teacher import training_prompts

    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    texts = [f"def f{i}(x):\n" for i in range(8)]
    train.write_text("".join(json.dumps({"id": str(i), "prompt": t}) + "\n" for i, t in enumerate(texts)))
    evals.write_text(json.dumps({"id": "e", "prompt": texts[2]}) + "\n")  # the third training prompt is an eval one
    cfg = load_config(_argv(tiny_model_dir, tmp_path, f"data.train.path={train}", "data.train.limit=8",
                            f"data.eval.path={evals}", "data.eval.split=train"))
    tokenizer = load_tokenizer(cfg.model)
    kept, _ = training_prompts(cfg.data, tokenizer)
    assert [p.id for p in kept] == ["0", "1", "3", "4", "5", "6", "7"]
    for n in range(1, len(kept) + 1):  # the limit that gives exactly the first n kept prompts
        limit = limit_for(cfg, tokenizer, n)
        at_limit = dataclasses.replace(cfg.data, train=dataclasses.replace(cfg.data.train, limit=limit))
        assert [p.id for p in training_prompts(at_limit, tokenizer)[0]] == [p.id for p in kept[:n]]
    assert limit_for(cfg, tokenizer, 2) == 2 and limit_for(cfg, tokenizer, 3) == 4


def test_a_budgeted_run_records_its_choice_resumes_with_it_and_refuses_another_budget(tiny_model_dir, tmp_path,
                                                                                      capsys):
    import ray

    argv = _argv(tiny_model_dir, tmp_path, "run.stages=[teacher]", "run.budget_min=600")
    # the dry run says the data will be sized when the run starts; with --estimate it sizes it now
    assert pm.main([*argv, "--dry-run"]) == 0
    assert "budget: the run will size data.train.limit (at most 6) to fit run.budget_min=600" in capsys.readouterr().out
    assert pm.main([*argv, "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "run.budget_min=600 would choose (a run starting now) data.train.limit=6 of at most 6" in out, out
    assert "for data.train.limit=6, the most run.budget_min may take" in out
    assert not (tmp_path / "r").exists()
    try:
        assert pm.main(argv) == 0
        out = capsys.readouterr().out
        run = tmp_path / "r"
        record = json.loads((run / "budget.json").read_text())
        assert record["limit"] == record["prompts"] == record["most"] == 6 and record["budget_min"] == 600
        assert "budget: run.budget_min=600 chose data.train.limit=6 of at most 6" in out
        assert set(record["minutes"]) == {"teacher", "elapsed"}  # only the stages this run runs
        assert "limit: 6" in (run / "resolved_config.yaml").read_text()
        # the summary says how the command did against the budget
        summary = json.loads((run / "summary.json").read_text())
        assert summary["budget"]["limit"] == 6 and 0 < summary["budget"]["command_minutes"] < 600
        assert "budget: run.budget_min=600 chose data.train.limit=6 (6 training prompts); this command took" in out
        # the same command again: the choice on record, the teacher reused, nothing timed again
        assert pm.main(argv) == 0
        out = capsys.readouterr().out
        assert "as chosen for run.budget_min=600 when this run started" in out and "timing this machine" not in out
        assert "stage teacher: reused" in out
    finally:
        ray.shutdown()
    # another budget (or cap) on the same run directory: a clear error, and the run's data is kept
    assert pm.main(_argv(tiny_model_dir, tmp_path, "run.stages=[teacher]", "run.budget_min=30")) == 2
    err = capsys.readouterr().err
    assert "sized to run.budget_min=600 with data.train.limit at most 6" in err and "run.budget_min=30" in err
    assert (run / "teacher" / "manifest.json").is_file() and (run / "budget.json").is_file()
    # the chosen limit named outright, without a budget, goes on with the same run
    assert pm.main(_argv(tiny_model_dir, tmp_path, "run.stages=[teacher]", "run.budget_min=0",
                         f"data.train.limit={record['limit']}", "--dry-run")) == 0
    assert "stage teacher: reused" in capsys.readouterr().out
    # a budget nothing fits in (the 3 minutes of start-up alone are over it): a clear error, nothing left behind
    small = tmp_path / "small"
    assert pm.main(_argv(tiny_model_dir, small, "run.stages=[teacher]", "run.budget_min=1")) == 2
    assert "run.budget_min=1: no training data fits it on this machine" in capsys.readouterr().err
    assert not (small / "r").exists()
    # a budget without a cap to size down from is refused when the config loads
    assert pm.main(_argv(tiny_model_dir, small, "run.budget_min=60", "data.train.limit=0")) == 2
    assert "set data.train.limit to the most prompts the run may take" in capsys.readouterr().err
