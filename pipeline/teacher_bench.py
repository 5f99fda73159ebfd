"""How fast the teacher stage's engine runs, against a bare batched forward loop of the same model.

    python -m pipeline.teacher_bench recipe=smollm2 --prompts 64 --repeats 3

Loads the recipe's base model and its first N training prompts (the recipe's data, responses, batch
size and top-k), and times, interleaved, per repeat:
- teacher: what a teacher actor does per shard except writing the file (`TeacherWorker.records`):
  length-sorted batches, the responses (corpus replies, or the engine's generation), and the recording
  pass (one batched forward over prompt + response, then hidden states, top-k and tail per position);
- bare: the same batches of the same token ids through the model's decoder, then the output layer at
  the recorded positions only, in one matmul: the least any dump of this data must compute. With
  generated responses the bare loop runs the same generation first, so the ratio is the recording's
  overhead.
Prints recorded tokens/s of both (median over repeats) and their ratio (the issue's target: >= 0.9).

With `--stages N` (teacher-forced responses) it also times a replica split into N pipeline stages
(pipeline/stages.py: N Ray actors, each with 1/N of the threads and 1/N of the layers, the batches streamed
through them), and prints how much of the stages' busy time overlapped.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from pipeline.config import load_config
from pipeline.stages import overlap_fraction
from pipeline.support import output_logits
from pipeline.teacher import TeacherWorker, decoder_hidden, training_prompts


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.teacher_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="recipe=NAME and key=value overrides, as for pipeline.main")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = teacher.cpus_per_actor")
    ap.add_argument("--stages", type=int, default=1, help="also time a replica split into this many stages")
    return ap.parse_args(argv)


@torch.no_grad()
def bare_forward(worker: TeacherWorker, prompts: list[dict]) -> int:
    """The same batches through the model's plain forward; returns the recorded positions it covers."""
    positions = 0
    for batch in worker.batches(prompts):
        chunk = [prompts[i] for i in batch]
        seqs = [p["input_ids"] + r for p, r in zip(chunk, worker.responses(chunk))]
        hidden_BTH = decoder_hidden(worker.model, seqs)
        # logits at the recorded positions only (last prompt token .. last response token), in one matmul
        rows = torch.cat([hidden_BTH[b, len(p["input_ids"]) - 1:len(s)] for b, (p, s) in enumerate(zip(chunk, seqs))])
        output_logits(worker.model, rows)
        positions += rows.shape[0]
    return positions


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.overrides)
    worker = TeacherWorker(cfg.model, cfg.teacher, "/nonexistent", None, None, cfg.run.seed)
    torch.set_num_threads(args.threads or cfg.teacher.cpus_per_actor)
    from pipeline.base_model import load_tokenizer

    prompts, _ = training_prompts(cfg.data, load_tokenizer(cfg.model), cfg.teacher.responses)
    corpus = cfg.teacher.responses == "corpus"
    prompts = [{"id": p.id, "input_ids": p.input_ids, **({"reply_ids": p.reply_ids} if corpus else {})}
               for p in prompts[:args.prompts]]  # what the teacher stage hands an actor
    worker.records(prompts[:2])  # warm-up, untimed
    runs = {"teacher": lambda: sum(len(s.tokens) for s in worker.records(prompts)),
            "bare": lambda: bare_forward(worker, prompts)}
    overlaps = []
    if args.stages > 1:
        import ray

        threads = torch.get_num_threads()
        split_cfg = dataclasses.replace(cfg.teacher, stages=args.stages, cpus_per_actor=max(1, threads // args.stages))
        ray.init(num_cpus=args.stages * split_cfg.cpus_per_actor, include_dashboard=False, log_to_driver=False)
        split = TeacherWorker(cfg.model, split_cfg, "/nonexistent", None, None, cfg.run.seed)
        split.records(prompts[:2])  # warm-up (and the stages finish loading), untimed

        def split_run() -> int:
            n = sum(len(s.tokens) for s in split.records(prompts))
            overlaps.append(overlap_fraction(split.busy))
            return n

        runs[f"split{args.stages}"] = split_run
    times = {k: [] for k in runs}
    tokens = {}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):  # alternate the order
            t = time.perf_counter()
            tokens[name] = runs[name]()
            times[name].append(time.perf_counter() - t)
    assert len(set(tokens.values())) == 1, tokens
    rate = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    report = {"prompts": len(prompts), "recorded_positions": tokens["teacher"], "responses": cfg.teacher.responses,
              "batch_size": cfg.teacher.batch_size, "threads": torch.get_num_threads(),
              "seconds": times, "tokens_per_s": rate, "ratio": rate["teacher"] / rate["bare"],
              "stage_overlap": overlaps}
    print(f"teacher engine vs bare forward loop: {len(prompts)} prompts, {tokens['teacher']} recorded positions, "
          f"responses={cfg.teacher.responses}, batch {cfg.teacher.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved repeats")
    for k in ("bare", *[k for k in runs if k != "bare"]):
        print(f"  {k:<8} {rate[k]:8.1f} recorded tokens/s  (seconds: {', '.join(f'{t:.1f}' for t in times[k])})")
    print(f"  ratio    {report['ratio']:.2f} (teacher / bare)")
    if overlaps:
        split_name = f"split{args.stages}"
        print(f"  ratio    {rate[split_name] / rate['bare']:.2f} ({split_name} / bare: {args.stages} stage actors of "
              f"{max(1, torch.get_num_threads() // args.stages)} thread(s); their busy time overlapped "
              f"{100 * statistics.median(overlaps):.0f}%, median)")
    return report


if __name__ == "__main__":
    main()
