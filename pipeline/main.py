"""draftforge: teacher -> train -> eval/gate -> export, in one command.

    python -m pipeline.main recipe=tiny                         # laptop / CI: local Ray, CPU, W&B offline
    python -m pipeline.main recipe=tiny --print-config          # resolved config, then exit
    python -m pipeline.main recipe=tiny --dry-run               # validate everything, show the plan, do nothing
    python -m pipeline.main recipe=smollm2 --estimate   # the dry run, plus minutes per stage timed here
    python -m pipeline.main recipe=llama70b --plan              # GPUs, memory, data size, hours from config.json
    python -m pipeline.main recipe=tiny train.epochs=1 eval.num_prompts=8   # dotted overrides
    ray job submit -- python -m pipeline.main recipe=llama70b   # on a cluster

Every stage is resumable: re-running the same command skips finished work (teacher shards,
training checkpoints, the eval record) and redoes only what is missing or corrupt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from pipeline import atomic
from pipeline.config import TRAINING_FREE, Config, ConfigError, available_recipes, load_config, to_dict, to_yaml
from pipeline.layout import RunLayout


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.main", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"recipes: {', '.join(available_recipes())}",
    )
    ap.add_argument("overrides", nargs="*", help="recipe=NAME and dotted key=value overrides")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--dry-run", action="store_true", help="validate config, model and data; print the plan; run nothing")
    ap.add_argument("--plan", action="store_true", help="print the resource plan from the base model's config.json "
                                                        "alone (no weights, no data, no hub) and exit")
    ap.add_argument("--estimate", action="store_true", help="the dry run, then time each stage's work on small "
                                                            "samples on this machine and print the minutes per stage "
                                                            "(CPU runs; pipeline/estimate.py)")
    ap.add_argument("--budget-min", type=float, default=None, metavar="MIN",
                    help="with --estimate: say whether the run fits MIN minutes, and which data.train.limit would")
    args = ap.parse_args(argv)
    if args.budget_min is not None and not args.estimate:
        ap.error("--budget-min needs --estimate")
    if args.budget_min is not None and args.budget_min <= 0:
        ap.error(f"--budget-min must be positive minutes (got {args.budget_min:g})")
    args.dry_run = args.dry_run or args.estimate
    return args, args.overrides


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir).resolve() / cfg.run.name


def dry_run(cfg: Config, run_dir: Path, estimate: bool = False, budget_min: float | None = None,
            started: float | None = None) -> int:
    """Check what can be checked without doing the work: model + tokenizer load, prompts load, and what
    each stage would do with the outputs already in the run directory. 2 when a stage would be refused.
    `estimate`: then time the stages' work on this machine (pipeline/estimate.py) and print the minutes.
    `started`: time.perf_counter() when the command began (what run.budget_min would leave; default now)."""
    from pipeline.plan import refusals

    started = time.perf_counter() if started is None else started
    # the same checks as a real run (architecture, settings vs the model, contexts): raises
    tokenizer, train_prompts, eval_prompts = preflight(cfg)
    print(f"base model: {cfg.model.base_model} (tokenizer: {len(tokenizer)} tokens) - ok")
    for split, prompts in (("train", train_prompts), ("eval", eval_prompts)):
        if prompts is not None:  # the eval prompts as drawn (eval.num_prompts)
            print(f"{split} prompts: {getattr(cfg.data, split).path} -> {len(prompts)} prompts - ok")
    cfg, plans, sized = budget_state(cfg, RunLayout(run_dir))
    for plan in plans:
        print(plan.line())
    print(f"outputs: {run_dir}")
    if refusals(plans):
        print("dry run: nothing was run")
        print("error: the run would be refused (see REFUSED above)", file=sys.stderr)
        return 2
    if sized and not estimate:
        print(f"budget: the run will size data.train.limit (at most {cfg.data.train.limit}) to fit run.budget_min="
              f"{cfg.run.budget_min:g} when it starts, timed then (about a minute); --estimate sizes it now")
    if estimate:
        from pipeline import estimate as est

        problem = est.estimate_problem(cfg)
        if problem:
            raise ValueError(problem)
        estimates, prompts = est.estimate_run(cfg, tokenizer, eval_prompts, plans)
        # a run sized to run.budget_min: its choice below, not the report's straight-line limit
        print(est.report(estimates, prompts, budget_min if sized else budget_min or cfg.run.budget_min or None,
                         of=f"for data.train.limit={cfg.data.train.limit}, the most run.budget_min may take; the "
                            "data it would take is below" if sized else ""))
        if sized:
            print(est.choose_budget_limit(cfg, tokenizer, estimates, prompts, started).line(
                "would choose (a run starting now)"))
    print("dry run: nothing was run")
    return 0


def budget_state(cfg: Config, run: RunLayout) -> tuple[Config, list, bool]:
    """`cfg` with the data.train.limit run.budget_min chose for this run (if on record), its stage plans, and
    whether the run is still to size its data (a budget, no choice on record, a fresh teacher stage)."""
    from pipeline.plan import plan_stages

    chosen = budget_on_record(cfg, run)
    if chosen is not None:
        cfg = with_train_limit(cfg, chosen)
    plans = plan_stages(cfg, run.root)
    return cfg, plans, chosen is None and budget_applies(cfg, plans)


def budget_on_record(cfg: Config, run: RunLayout) -> int | None:
    """The data.train.limit run.budget_min chose when this run started (its budget.json), or None when it has
    not chosen one; ValueError when the run directory's choice was made for another budget or cap."""
    if not run.budget.is_file():
        return None
    record = json.loads(run.budget.read_text())
    if not cfg.run.budget_min and cfg.data.train.limit == record["limit"]:
        return None  # the chosen limit named outright: the config is already what the run used
    if not cfg.run.budget_min or (record["budget_min"], record["most"]) != (cfg.run.budget_min,
                                                                          cfg.data.train.limit):
        raise ValueError(f"{run.budget}: this run's training data was sized to run.budget_min={record['budget_min']:g} "
                         f"with data.train.limit at most {record['most']} (it chose {record['limit']}), and this "
                         f"command says run.budget_min={cfg.run.budget_min:g} and data.train.limit="
                         f"{cfg.data.train.limit}: use those values (or run.budget_min=0 data.train.limit="
                         f"{record['limit']}) to go on with this run, or a new run.name")
    print(f"budget: data.train.limit={record['limit']}, as chosen for run.budget_min={record['budget_min']:g} when "
          f"this run started ({run.budget})", flush=True)
    return int(record["limit"])


def budget_applies(cfg: Config, plans: list) -> bool:
    """run.budget_min sizes the data of a teacher stage that starts from nothing, never data that exists."""
    from pipeline.plan import RUN

    if not cfg.run.budget_min:
        return False
    teacher = [p for p in plans if p.stage == "teacher"]
    if teacher and teacher[0].action != RUN:
        print(f"budget: run.budget_min does not resize the teacher data this run already has ({teacher[0].line()})",
              flush=True)
    return bool(teacher) and teacher[0].action == RUN


def with_train_limit(cfg: Config, limit: int) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=dataclasses.replace(cfg.data.train,
                                                                                                 limit=limit)))


def init_ray(cfg: Config) -> None:
    import ray

    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard (on by default when ray[default] is installed) also serves the State API;
        # without it Ray Train's PlacementGroupCleaner warns every second that it cannot poll.
        # address="local": always this run's own cluster, never one a `ray start` left on this machine.
        # Ray's State API in our workers (Ray Train's PlacementGroupCleaner polls it) finds its cluster by
        # scanning the machine, and with a second run's cluster there it fails ("Found multiple active Ray
        # instances"): pin the dashboard to a port chosen here and point the workers' State API at it.
        port = start_local_ray(
            lambda port: dict(address="local", num_cpus=cfg.run.num_cpus or None, log_to_driver=True,
                              include_dashboard=True, dashboard_port=port,
                              logging_level=logging.WARNING,  # our own line below instead of Ray's INFO
                              runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                                                        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}))
        print(f"ray: a local cluster for this run; dashboard http://127.0.0.1:{port}", flush=True)


RAY_START_ATTEMPTS = 3


def start_local_ray(options, attempts: int = RAY_START_ATTEMPTS) -> int:
    """ray.init(**options(port)) for a new local cluster, with a free port for its dashboard; returns the port.
    Ray gives a starting node a fixed 30 s to register its raylet, and on a 2-core machine that other work
    keeps busy it can miss that ("The current node timed out during startup"). Nothing of the run exists yet
    then, so the cluster is shut down and started again, up to `attempts` times, with a line each time."""
    import ray

    for attempt in range(2, attempts + 1):
        port = free_port()
        try:
            ray.init(**options(port))
            return port
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            print(f"ray: the local cluster did not start in time ({e}); starting it again "
                  f"({attempt}/{attempts})", file=sys.stderr, flush=True)
    port = free_port()  # the last attempt: its error reaches the caller
    ray.init(**options(port))
    return port


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it); Ray binds it a moment later."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # run.budget_min counts from here
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = run_dir_of(cfg)
    if args.print_config or args.dry_run:
        print("=== resolved config ===\n" + to_yaml(cfg))
    else:  # a run keeps its console short: the whole config is one flag away and in the run directory
        print(f"config: {' '.join(overrides) or '(base)'}; resolved config in {run_dir / 'resolved_config.yaml'} "
              "(or add --print-config)", flush=True)
    if args.print_config:
        return 0
    try:
        return _run(args, cfg, run_dir, argv, started)
    finally:
        ConsoleLog.close()  # opened by run_pipeline once the run directory is claimed


def _run(args, cfg: Config, run_dir: Path, argv: list[str] | None, started: float) -> int:
    previous = _stop_on_sigterm()
    try:
        if args.plan:
            from pipeline.resources import load_model_config, resource_plan

            print(resource_plan(cfg, load_model_config(cfg.model)).text())
            return 0
        if args.dry_run:
            return dry_run(cfg, run_dir, args.estimate, args.budget_min, started)
        summary = run_pipeline(cfg, run_dir, started)
    except ValueError as e:  # user errors: bad model path, bad data, mismatched inputs
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted. {_saved(run_dir)} Rerun the same command to resume: "
              f"python -m pipeline.main {' '.join(argv if argv is not None else sys.argv[1:])}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - anything else: one line, the full traceback in the run directory
        import traceback

        log = RunLayout(run_dir).error_log
        try:
            if run_dir.is_dir():
                atomic.write_text(log, traceback.format_exc())
        except OSError:
            pass  # a full disk: the console line below still says what happened
        if disk_full(e):
            print(f"error: no space left on the disk of {run_dir} ({free_bytes(run_dir) / 1e6:.1f} MB free). "
                  f"{_saved(run_dir)} Nothing partial is kept or used later: free space (or point run.output_dir "
                  "at a larger disk, moving the run directory along) and rerun the same command to resume.",
                  file=sys.stderr)
            return 1
        print(f"error: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}. {_saved(run_dir)} "
              + (f"Full traceback: {log}. " if log.is_file() else "")
              + "Rerun the same command to resume.", file=sys.stderr)
        return 1
    finally:
        _restore_sigterm(previous)
    print_summary(summary)
    return 0


class ConsoleLog:
    """Everything the run prints (its own lines, the workers' lines Ray forwards, progress bars) also goes to
    <run_dir>/console.log, appended per invocation: the full log stays with the run. Lines written below
    Python (Ray's C++ core) reach the terminal only; Ray keeps them in its session logs."""

    _streams: tuple | None = None
    _file = None

    class _Tee:
        def __init__(self, stream, file):
            self.stream, self.file = stream, file

        def write(self, text):
            if self.file is not None:
                try:
                    self.file.write(text)
                except (OSError, ValueError):  # a full disk: the terminal still gets every line
                    self.file = None
            return self.stream.write(text)

        def flush(self):
            if self.file is not None:
                try:
                    self.file.flush()
                except (OSError, ValueError):
                    self.file = None
            self.stream.flush()

        def __getattr__(self, name):  # isatty, fileno, encoding...: the terminal's
            return getattr(self.stream, name)

    @classmethod
    def open(cls, path: Path) -> None:
        cls.close()
        try:
            cls._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed by close()
            cls._file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} run started\n")
        except OSError:
            cls._file = None
            return
        cls._streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = cls._Tee(sys.stdout, cls._file), cls._Tee(sys.stderr, cls._file)

    @classmethod
    def close(cls) -> None:
        if cls._streams is not None:
            sys.stdout, sys.stderr = cls._streams
            cls._streams = None
        if cls._file is not None:
            try:
                cls._file.close()
            except OSError:
                pass
            cls._file = None


def disk_full(e: BaseException) -> bool:
    """Whether `e` or an exception it was raised from is a full disk (or quota), also when a Ray task or
    worker raised it (Ray wraps those, keeping the original's text)."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _stop_on_sigterm():
    """SIGTERM (`kill`, `ray job stop`, a scheduler's preemption) stops the run like Ctrl-C does: the stage is
    recorded as interrupted in summary.json and the console says how to resume."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, interrupt)


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _saved(run_dir: Path) -> str:
    """What a stopped run keeps, from its summary.json (written as stages finish)."""
    path = RunLayout(run_dir).summary
    if not path.is_file():
        return "Nothing was saved yet."
    stages = json.loads(path.read_text()).get("stages", {})
    done = [k for k, v in stages.items() if v == "done"]
    return (f"Saved in {run_dir}: " + (f"finished stages {', '.join(done)}; " if done else "")
            + "finished teacher shards and training checkpoints are kept (summary.json has each stage's status).")


def preflight(cfg: Config) -> tuple:
    """Checks that must pass before Ray starts or anything is written: the base model resolves (a GGUF
    is converted here, once, before any actor needs it), its architecture is supported (pipeline/support.py),
    the settings fit it (teacher.top_k, the teacher's and the eval's contexts, workers vs shards), and the
    eval prompts load and fit. Returns (tokenizer, training prompts or None, eval prompts or None) as loaded
    here, for the dry run to report without loading them again."""
    from transformers import AutoConfig

    from data.prompts import load_prompt_set
    from pipeline.base_model import check_vocab, load_tokenizer, resolve_model_path
    from pipeline.support import check_support
    from pipeline.tracking import online_credentials_problem

    problem = online_credentials_problem(cfg.tracking)
    if problem:
        raise ValueError(problem)
    if cfg.model.trust_remote_code:
        print(f"WARNING: model.trust_remote_code=true: Python code shipped with {cfg.model.base_model!r} will run "
              "in this process and in every teacher actor and training worker", file=sys.stderr, flush=True)
    path = resolve_model_path(cfg.model)
    config = AutoConfig.from_pretrained(path, revision=cfg.model.revision or None,
                                        trust_remote_code=cfg.model.trust_remote_code)
    check_support(config, cfg.model.allow_untested)
    tokenizer = load_tokenizer(cfg.model)
    check_vocab(tokenizer, config.get_text_config().vocab_size, cfg.model.base_model)
    train_prompts = None
    if "teacher" in cfg.run.stages:  # their lengths decide the teacher's context and the shard count
        train_prompts, _ = load_prompt_set(cfg.data.train, tokenizer, cfg.data.max_prompt_tokens, cfg.data.chat_template)
    problems = settings_problems(cfg, config.get_text_config(), train_prompts)
    prompts = None
    if "eval" in cfg.run.stages:
        from data.prompts import select_prompts

        prompts, _ = load_prompt_set(cfg.data.eval, tokenizer, cfg.data.max_prompt_tokens, cfg.data.chat_template)
        prompts = select_prompts(prompts, cfg.eval.num_prompts, cfg.eval.seed)  # the ones the eval will run
        max_positions = getattr(config.get_text_config(), "max_position_embeddings", None)
        L = cfg.eval.beam_length or cfg.drafter.horizon  # auto chooses at most the drafter's horizon
        need = max(len(p.input_ids) for p in prompts) + cfg.eval.max_new_tokens + cfg.eval.beam_width * L + L
        if max_positions and need > max_positions:
            problems.append(f"the longest eval prompt + eval.max_new_tokens + the beams' slots (eval.beam_width x "
                            f"eval.beam_length + eval.beam_length) = {need} positions, more than the base model's "
                            f"max_position_embeddings={max_positions}: lower eval.max_new_tokens or the beam settings")
    if problems:
        raise ValueError("settings that cannot work with this base model:\n  " + "\n  ".join(problems))
    return tokenizer, train_prompts, prompts


def settings_problems(cfg: Config, text_config, train_prompts: list | None = None) -> list[str]:
    """Settings checked against the base model's config (and the training prompts, when the teacher stage
    runs), before any work: the drafter's start, the teacher's own checks (pipeline/teacher.py) and workers
    vs shards."""
    import math

    from pipeline import teacher
    from pipeline.drafter import base_head_width_problem

    problems = []
    H = text_config.hidden_size
    exit_dim = cfg.drafter.exit_dim or 2 * H  # 0 means the reference's 2H
    if "train" in cfg.run.stages and cfg.drafter.init == "base_head":
        problems += filter(None, [base_head_width_problem(exit_dim, H)])
    if not train_prompts:
        return problems
    problems += teacher.settings_problems(cfg.teacher, text_config, train_prompts)
    shards = math.ceil(len(train_prompts) / cfg.teacher.shard_size)  # at most this many
    if "train" in cfg.run.stages and shards < cfg.train.num_workers:
        problems.append(f"{len(train_prompts)} training prompts make at most {shards} teacher shard(s) of "
                        f"teacher.shard_size={cfg.teacher.shard_size} for train.num_workers={cfg.train.num_workers}: "
                        "every worker reads whole shards; lower teacher.shard_size or train.num_workers")
    elif "train" in cfg.run.stages:  # the teacher writes one sequence per prompt: the split training will make
        from pipeline.estimate import training_split

        try:
            training_split(cfg, len(train_prompts))
        except ValueError as e:
            problems.append(f"the training stage would refuse the teacher's {len(train_prompts)} sequences: {e}; "
                            "raise data.train.limit or lower train.batch_size, train.num_workers or "
                            "train.heldout_fraction")
    return problems


def lock_run_dir(run_dir: Path):
    """An exclusive lock on run_dir/.lock until the returned file is closed (or the process ends); a second
    run pointed at the same directory gets a clear error instead of interleaving its writes. The lock dies
    with the process, so a killed run never leaves a stale lock behind."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(RunLayout(run_dir).lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{run_dir} is in use by another run ({holder}); wait for it to finish, or use another "
                         "run.name / run.output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def run_pipeline(cfg: Config, run_dir: Path, started: float | None = None) -> dict:
    """Run the stages in run_dir; `started`: time.perf_counter() when the command began (run.budget_min counts
    from it; default now)."""
    started = time.perf_counter() if started is None else started
    tokenizer, _, eval_prompts = preflight(cfg)
    created = not run_dir.exists()
    lock = lock_run_dir(run_dir)  # held while this run lasts: a second run on the same directory refuses
    try:
        try:
            cfg = _sized_to_budget(cfg, RunLayout(run_dir), tokenizer, eval_prompts, started)
        except BaseException:
            if created:  # nothing of the run was written
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return _run_stages(cfg, RunLayout(run_dir), created, started)
    finally:
        lock.close()


def _sized_to_budget(cfg: Config, run: RunLayout, tokenizer, eval_prompts, started: float) -> Config:
    """`cfg` with the data.train.limit run.budget_min chose, on record or chosen now (written to budget.json)."""
    cfg, plans, sized = budget_state(cfg, run)
    if not sized:
        return cfg
    from pipeline import estimate as est

    problem = est.estimate_problem(cfg)
    if problem:
        raise ValueError(f"run.budget_min: {problem}")
    print(f"budget: timing this machine to size data.train.limit (at most {cfg.data.train.limit}) to run.budget_min="
          f"{cfg.run.budget_min:g}", flush=True)
    estimates, prompts = est.estimate_run(cfg, tokenizer, eval_prompts, plans)
    choice = est.choose_budget_limit(cfg, tokenizer, estimates, prompts, started)
    atomic.write_json(run.budget, dataclasses.asdict(choice))
    print(choice.line(), flush=True)
    return with_train_limit(cfg, choice.limit)


def _run_stages(cfg: Config, run: RunLayout, created: bool, started: float) -> dict:
    from pipeline.plan import plan_stages, refusals
    from pipeline.tracking import open_run

    run_dir = run.root
    plans = plan_stages(cfg, run_dir)  # nothing in the run directory is touched before these checks pass
    refused = refusals(plans)
    if refused:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise ValueError("\n".join(p.line() for p in refused) + "\nNothing was written.")
    ConsoleLog.open(run.console)
    for plan in plans:
        print(plan.line(), flush=True)
    run.resolved_config.write_text(to_yaml(cfg))
    init_ray(cfg)
    _stop_on_sigterm()  # again: ray.init installs a handler that aborts the driver on SIGTERM

    def stage_run(job_type: str):  # one W&B run per stage, all in the group of this pipeline run
        return open_run(cfg.tracking, run_dir, name=f"{cfg.run.name}-{job_type}", job_type=job_type,
                        group=cfg.run.name, config=to_dict(cfg))

    times: dict[str, float] = {}
    status: dict[str, str] = {stage: "pending" for stage in cfg.run.stages}
    summary: dict = {"run_dir": str(run_dir), "stage_seconds": times, "stages": status}
    if run.budget.is_file():  # the run's data was sized to run.budget_min: how this command did against it
        summary["budget"] = json.loads(run.budget.read_text())

    def write_summary() -> None:  # after every stage and on failure: the run directory keeps the record
        try:
            atomic.write_json(run.summary, summary, default=str)
        except OSError as e:  # a full disk must not hide the error that stopped the run
            print(f"warning: could not write {run.summary}: {e}", file=sys.stderr)

    current = None
    try:
        current = "teacher"
        if "teacher" in cfg.run.stages:
            from pipeline.teacher import run_teacher

            t = time.time()
            manifest = run_teacher(cfg.model, cfg.data, cfg.teacher, run.teacher, seed=cfg.run.seed)
            times["teacher"] = time.time() - t
            tracker = stage_run("teacher")
            tracker.log({"teacher/sequences": manifest["num_sequences"], "teacher/tokens": manifest["num_tokens"],
                         "teacher/seconds": times["teacher"]})
            tracker.summary.update({"teacher/tokens": manifest["num_tokens"], "teacher/seconds": times["teacher"]})
            tracker.finish()
            status["teacher"] = "done"
            write_summary()
        current = "train"
        if "train" in cfg.run.stages:
            from pipeline.train import run_train

            t = time.time()
            train_result = run_train(cfg.model, cfg.drafter, cfg.train, cfg.tracking, run.teacher, run.train,
                                     seed=cfg.run.seed, wandb_group=cfg.run.name, wandb_dir=run_dir)
            times["train"] = time.time() - t
            summary["train"] = train_result
            status["train"] = "done"
            write_summary()
        current = "eval"
        if "eval" in cfg.run.stages:
            tracker = stage_run("eval")
            try:
                summary.update(evaluate_and_gate(cfg, run, tracker, times))
            finally:
                tracker.finish()
            status["eval"] = "done"
    except BaseException as e:  # KeyboardInterrupt too: record where it stopped, then let main() report it
        if current in status:
            status[current] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            summary["error"] = {"stage": current, "type": e.__class__.__name__, "message": str(e)[:2000]}
        raise
    finally:
        wandb_dir = run.wandb
        summary["wandb"] = (f"{wandb_dir} (group {cfg.run.name!r}; `wandb sync {wandb_dir}/offline-run-*` uploads it)"
                            if cfg.tracking.mode == "offline" else
                            f"group {cfg.run.name!r} in project {cfg.tracking.project!r}"
                            if cfg.tracking.mode == "online" else "disabled")
        if "budget" in summary:
            summary["budget"]["command_minutes"] = (time.perf_counter() - started) / 60
        write_summary()
        import ray

        ray.shutdown()  # the cluster this run started (or its connection to a submitted job's): a caller may run again
    return summary


def evaluate_and_gate(cfg: Config, run: RunLayout, tracker, times: dict) -> dict:
    """Eval (vs plain, the training-free baselines and the incumbent), gate, export, registry."""
    from eval.evaluate import eval_set_key, run_eval
    from pipeline.base_model import base_model_fingerprint, resolve_model_path
    from pipeline.gate import decide, find_incumbent, publish, record_promotion
    from pipeline.gguf import gguf_source
    from pipeline.lineage import code_version, hash_json, sha256_file

    t = time.time()
    drafter_dir = run.drafter
    if not (drafter_dir / "drafter.safetensors").is_file():
        raise ValueError(f"no trained drafter in {drafter_dir}: run the train stage first")
    candidate_sha = sha256_file(drafter_dir / "drafter.safetensors")
    base_hash = base_model_fingerprint(cfg.model)
    trained_for = json.loads((drafter_dir / "train_metrics.json").read_text()).get("base_model_hash") \
        if (drafter_dir / "train_metrics.json").is_file() else None
    if trained_for and trained_for != base_hash:
        raise ValueError(f"the drafter in {drafter_dir} was trained on teacher data of another base model (hash "
                         f"{trained_for[:12]}..., model.base_model {cfg.model.base_model!r} is {base_hash[:12]}...): "
                         "rerun the teacher and train stages for this base model, or point at its run directory")
    set_key = eval_set_key(cfg.data, cfg.eval)
    registry = Path(cfg.gate.registry_dir or Path(cfg.run.output_dir) / "registry").resolve()
    incumbent = find_incumbent(registry, base_hash, set_key, candidate_sha)
    if incumbent is not None:
        print(f"eval: comparing with the incumbent promoted drafter {incumbent}")
    record = run_eval(cfg.model, cfg.data, cfg.eval, drafter_dir, run.eval, incumbent_dir=incumbent)
    times["eval"] = time.time() - t
    decision = decide(record, cfg.gate)
    teacher_manifest = run.teacher_manifest
    lineage = {
        "base_model": cfg.model.base_model, "base_model_hash": base_hash,
        "base_model_gguf": gguf_source(resolve_model_path(cfg.model)),  # GGUF file, sha256, quantization
        "teacher_manifest_hash": hash_json(json.loads(teacher_manifest.read_text()))
        if teacher_manifest.is_file() else None,
        "drafter_sha256": candidate_sha, "incumbent": str(incumbent) if incumbent else None,
        "recipe": to_dict(cfg), "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest = json.loads(teacher_manifest.read_text()) if teacher_manifest.is_file() else None
    data = ({"num_sequences": manifest["num_sequences"], "num_tokens": manifest["num_tokens"],
             "prompt_accounting": manifest.get("prompt_accounting", {}),
             "responses": manifest.get("recipe", {}).get("teacher", {}).get("responses", "generate")}
            if manifest else None)
    export_dir = publish(decision, drafter_dir, record, lineage, run.export, tracker,
                         artifact_name=f"drafter-{cfg.run.name}", data=data)
    if decision["promoted"]:
        record_promotion(registry, base_hash, set_key, export_dir, record, candidate_sha)
    log_eval_tables(tracker, record, run.eval / "eval.png")
    tracker.log({f"eval/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
    tracker.log({f"eval/{m}/{k}": v for m, r in record["methods"].items() for k, v in r.items()
                 if isinstance(v, (int, float))})
    tracker.summary.update({"tokens_per_step": record["tokens_per_step"], "speedup": record["speedup"],
                            "lossless": record["lossless"], "promoted": decision["promoted"]})
    return {"record": record, "decision": decision, "export_dir": str(export_dir)}


def log_eval_tables(tracker, record: dict, plot: Path) -> None:
    """The eval as W&B tables (one row per method; one per category and method) and the plot as an image."""
    from pipeline.tracking import NullRun

    if isinstance(tracker, NullRun) or tracker is None:
        return
    import wandb

    from eval.compare import ci_text

    methods = wandb.Table(columns=["method", "tau", "tokens_per_s", "speedup", "speedup_ci95", "lossless"])
    by_category = wandb.Table(columns=["category", "method", "tau", "speedup"])
    for name, m in record.get("methods", {}).items():
        methods.add_data(name, m["tokens_per_step"], m["tokens_per_s"], m["speedup"],
                         ci_text(m["speedup_ci95"]).lstrip("±"), str(m["lossless"]))
        for c, v in sorted(m.get("by_category", {}).items()):
            by_category.add_data(c, name, v["tokens_per_step"], v["speedup"])
    logged = {"eval/methods": methods, "eval/by_category": by_category}
    if plot.is_file():
        logged["eval/plot"] = wandb.Image(str(plot))
    tracker.log(logged)


def print_summary(summary: dict) -> None:
    from eval.compare import ci_text, method_table

    print("\n=== draftforge summary ===")
    times = summary.get("stage_seconds", {})
    if times:
        print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    if "budget" in summary:
        b = summary["budget"]
        print(f"budget: run.budget_min={b['budget_min']:g} chose data.train.limit={b['limit']} ({b['prompts']} training "
              f"prompts); this command took {b.get('command_minutes', 0):.1f} min")
    if "record" in summary:
        r, d = summary["record"], summary["decision"]
        print(f"tokens/step (tau): {r['tokens_per_step']:.2f}  "
              f"(W={r['beam_width']}, L={r['beam_length']}{' chosen for this device' if r.get('beam_shape') else ''}, "
              f"{r['num_prompts']} prompts)")
        print(f"speedup vs plain greedy: {r['speedup']:.2f}x {ci_text(r['speedup_ci95'])} "
              f"({r['spec_tokens_per_s']:.0f} vs {r['plain_tokens_per_s']:.0f} tokens/s)")
        print(f"lossless: {r['lossless']}")
        if r.get("cpu_kernels", {}).get("auto"):  # eval.cpu_kernels=auto timed both kernels on this machine
            ms = {k: {str(q): t for q, t in v.items()} for k, v in r["cpu_kernels"]["auto"]["forward_ms"].items()}
            print(f"cpu kernels: {r['cpu_kernels']['kernels']} (auto; verify forward over 1 / 4 tokens: "
                  + ", ".join(f"{k} {v['1']:.1f} / {v['4']:.1f} ms" for k, v in ms.items()) + ")")
        if "ideal_speedup" in r:
            prof = r["step_profile"]
            # records made before the timed run was timed hold the profile's step times only
            t = r.get("ideal_timing") or {"source": "profile", "prompts": prof.get("profiled_prompts"),
                                          "plain_step_ms": prof["plain_step_ms"],
                                          "verify_forward_ms": prof["ms_per_step"]["base_forward"]}
            print(f"ideal speedup here: {r['ideal_speedup']:.2f}x (tau x plain step {t['plain_step_ms']:.1f} ms / "
                  f"verify forward {t['verify_forward_ms']:.1f} ms, from the {t['source']} over {t['prompts']} "
                  f"prompts); decoder efficiency {r['decoder_efficiency']:.2f}; drafter "
                  f"{100 * prof['cost_ratio']['ratio']:.1f}% of a base token per draft")
        print("\n".join(method_table(r.get("methods", {}), indent="  ")))
        methods = r.get("methods", {})
        free = {k: v for k, v in methods.items() if k in TRAINING_FREE}
        best_free = max(free, key=lambda k: free[k]["speedup"], default=None)
        if best_free and free[best_free]["speedup"] > r["speedup"]:
            print(f"fastest here: {best_free} ({free[best_free]['speedup']:.2f}x), a training-free method, beats the "
                  f"drafter ({r['speedup']:.2f}x) on this base model and eval set")
        categories = sorted({c for m in r.get("methods", {}).values() for c in m.get("by_category", {})})
        if categories:
            names = list(r["methods"])
            print("  per category (tau / speedup vs plain): " + "  ".join(names))
            for c in categories:
                cells = [r["methods"][n].get("by_category", {}).get(c) for n in names]
                print(f"    {c:<12}" + "".join(f"{x['tokens_per_step']:>6.2f} /{x['speedup']:>5.2f}x" if x else f"{'-':>15}"
                                           for x in cells))
        if "hybrid_behind" in r:
            behind = r["hybrid_behind"]
            print("hybrid: the fastest method overall and in every category" if not behind else
                  "hybrid: not the fastest in " + "; ".join(
                      f"{scope} ({', '.join(f'{m} {x:.2f}x' for m, x in v.items() if m != 'hybrid')} vs "
                      f"hybrid {v['hybrid']:.2f}x)" for scope, v in behind.items()))
        print(f"{'PROMOTED' if d['promoted'] else 'NOT promoted (kept as candidate)'}: {d['reason']}")
        print(f"drafter: {summary['export_dir']}")
    print(f"W&B run: {summary.get('wandb')}")
    print(f"run directory: {summary['run_dir']}")


if __name__ == "__main__":
    sys.exit(main())
