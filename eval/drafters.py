"""Compare trained drafters of the same base model in ONE interleaved run against one plain baseline:
draft vocabulary sizes, exit widths, KL vs CE training, ...

    python -m eval.drafters outputs/smollm2 outputs/smollm2-v2k outputs/smollm2-ce --num-prompts 16

Every run directory must hold a trained drafter (train/drafter) for the same base model (checked by
the teacher manifests' base model hash). Prompts, base model and beam settings come from the first
run's resolved config (override with --width / --length). For each drafter it prints: draft
vocabulary and its coverage, drafter multiply-adds per draft as a share of a base token, held-out top-1
agreement per draft position (from training), tau, tokens/s and speedup vs plain greedy with a 95%
interval over repeats, whether every output equals plain greedy decoding, and the ideal speedup
(tau x plain step / verify forward, both measured here; eval/profile.py). Writes --out (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import torch

from data.prompts import load_prompts, select_prompts
from eval.compare import ci_text, compare
from eval.cpu_kernels import apply_cpu_kernels
from eval.decoder import plain_greedy
from eval.evaluate import load_trained_drafter, with_model_answers
from eval.profile import cost_ratio, ideal_at, profile_decoder
from eval.speculative import SpeculativeDecoder
from pipeline.base_model import load_base_model
from pipeline.config import Config, load_run_config
from pipeline.layout import RunLayout
from pipeline.train import heldout_top1


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.drafters", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path, help="pipeline run directories with trained drafters")
    ap.add_argument("--num-prompts", type=int, default=16, help="eval prompts, drawn stratified by category")
    ap.add_argument("--eval-data", default="", help="eval prompt source instead of the first run's data.eval.path "
                    "(e.g. mtbench: with --num-prompts 80, all 80 MT-bench questions)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0 = the first run's eval.max_new_tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--width", type=int, default=0, help="beam width; 0 = the first run's eval.beam_width")
    ap.add_argument("--length", type=int, default=0, help="beam length (with g0); 0 = the first run's")
    ap.add_argument("--profile-prompts", type=int, default=4, help="prompts for the ideal-speedup profile; 0 = skip")
    ap.add_argument("--hybrid", default="", help="also measure each drafter's hybrid drafting (docs/design.md §3.3): "
                    "comma-separated modes, 'tree' (the lookup path added to the tree) and/or 'switchM' (the lookup path "
                    "instead of the drafter's where a match of at least M tokens exists) or 'switchMkK' (and K-token lookup paths, "
                    "no drafter, in steps where every row has such a match), e.g. tree,switch2,switch2k10")
    ap.add_argument("--hybrid-ngram", type=int, default=3, help="the hybrid's longest prompt-lookup n-gram")
    ap.add_argument("--prompt-lookup", action="store_true", help="also measure transformers' prompt lookup")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("outputs/drafters.json"))
    return ap.parse_args(argv)


def _hybrid_mode(mode: str) -> tuple[int, int]:
    """(switch, lookup_length) of a --hybrid mode: tree = (0, 0), switchM = (M, 0), switchMkK = (M, K)."""
    m = re.fullmatch(r"switch(\d+)(?:k(\d+))?", mode)
    if mode != "tree" and not m:
        raise SystemExit(f"error: --hybrid mode {mode!r}: use tree, switchM or switchMkK (M = the shortest match, "
                         "K = the lookup path length where every row has one)")
    return (0, 0) if mode == "tree" else (int(m[1]), int(m[2] or 0))


def _base_hash(run_dir: Path) -> str:
    path = RunLayout(run_dir).teacher_manifest
    if not path.is_file():
        raise ValueError(f"{run_dir}: no teacher manifest ({path}); is it a pipeline run directory?")
    return json.loads(path.read_text())["base_model_hash"]


@torch.inference_mode()
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [d.resolve() for d in args.run_dirs]
    for d in runs:
        if not (RunLayout(d).drafter / "drafter.safetensors").is_file():
            raise SystemExit(f"error: {d} holds no trained drafter (train/drafter/drafter.safetensors)")
    hashes = {d.name: _base_hash(d) for d in runs}
    if len(set(hashes.values())) != 1:
        raise SystemExit(f"error: the drafters were trained for different base models: {hashes}")
    if len({d.name for d in runs}) != len(runs):
        raise SystemExit("error: run directories must have distinct names (they label the methods)")
    cfg: Config = load_run_config(runs[0])
    model, tok = load_base_model(cfg.model, device=cfg.eval.device, dtype=cfg.eval.dtype)
    apply_cpu_kernels(model, cfg.eval.cpu_kernels)
    W, L = args.width or cfg.eval.beam_width, args.length or cfg.eval.beam_length
    n, eos = args.max_new_tokens or cfg.eval.max_new_tokens, tok.eos_token_id
    source = dataclasses.replace(cfg.data.eval, path=args.eval_data) if args.eval_data else cfg.data.eval
    prompts = select_prompts(load_prompts(source, tok, cfg.data.max_prompt_tokens, cfg.data.chat_template),
                             args.num_prompts, cfg.eval.seed)
    prompts = with_model_answers(prompts, model, tok, args.max_new_tokens or cfg.eval.max_new_tokens,
                                 cfg.data.max_prompt_tokens)
    drafters = {d.name: load_trained_drafter(RunLayout(d).drafter, model, model.dtype) for d in runs}
    decoders = {name: SpeculativeDecoder(model, dr, beam_width=W, beam_length=L) for name, dr in drafters.items()}
    methods = {"plain": lambda b: plain_greedy(model, b, n, eos)}
    methods.update({name: (lambda b, dec=dec: dec.generate(b, n, eos)) for name, dec in decoders.items()})
    extra = {}  # hybrid modes and the prompt-lookup baseline, beside the drafters
    for mode in [m.strip() for m in args.hybrid.split(",") if m.strip()]:
        switch, length = _hybrid_mode(mode)
        for name, dr in drafters.items():
            dec = SpeculativeDecoder(model, dr, beam_width=W, beam_length=L, ngram=args.hybrid_ngram, switch=switch,
                                     lookup_length=length)
            extra[f"{name}+{mode}"] = lambda b, dec=dec: dec.generate(b, n, eos)
    if args.prompt_lookup:
        from eval.baselines import prompt_lookup_generate

        extra["prompt_lookup"] = lambda b: prompt_lookup_generate(model, b, n, eos)
    methods.update(extra)
    print(f"comparing {len(runs)} drafters, W={W} L={L}, {len(prompts)} prompts x {n} new tokens, "
          f"{args.repeats} interleaved repeats, {torch.get_num_threads()} threads")
    results = compare(methods, prompts, 1, args.repeats)

    report = {"beam_width": W, "beam_length": L, "num_prompts": len(prompts), "max_new_tokens": n,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "prompt_ids": [p.id for p in prompts],
              "plain_tokens_per_s": results["plain"]["tokens_per_s"],
              "plain_step_timing": results["plain"].get("step_timing"), "drafters": {}}
    for d in runs:
        name = d.name
        metrics = json.loads((RunLayout(d).drafter / "train_metrics.json").read_text())
        arch = json.loads((RunLayout(d).drafter / "arch.json").read_text())
        r = results[name]
        entry = {
            "draft_vocab_size": arch.get("draft_vocab_size", 0), "exit_dim": arch["exit_dim"],
            "objective": metrics.get("inputs", {}).get("train", {}).get("objective", "kl"),
            "coverage": metrics.get("draft_vocab", {}).get("coverage"),
            "cost": cost_ratio(decoders[name]),
            "heldout_top1": heldout_top1(RunLayout(d).drafter),
            "tokens_per_step": r["tokens_per_step"], "tokens_per_s": r["tokens_per_s"], "speedup": r["speedup"],
            "speedup_ci95": r["speedup_ci95"], "speedup_per_repeat": r["speedup_per_repeat"],
            "speedup_ci95_repeats": r["speedup_ci95_repeats"], "lossless": r["lossless"],
            "acceptance_per_position": r["acceptance_per_position"],
        }
        if args.profile_prompts:
            prof = profile_decoder(decoders[name], [p.input_ids for p in prompts[:args.profile_prompts]], n, eos)
            entry["profile_ideal_speedup"] = ideal_at(r["tokens_per_step"], prof)
            entry["profile_ms_per_step"] = prof["ms_per_step"]
            entry["profile_plain_step_ms"] = prof["plain_step_ms"]
        # as the eval stage: the timed run's own step times where it was timed (CPU), else the profile's
        if "ideal_speedup" in r:
            entry["ideal_speedup"], entry["step_timing"] = r["ideal_speedup"], r["step_timing"]
        elif args.profile_prompts:
            entry["ideal_speedup"] = entry["profile_ideal_speedup"]
        if "ideal_speedup" in entry:
            entry["decoder_efficiency"] = r["speedup"] / entry["ideal_speedup"]
        report["drafters"][name] = entry

    print(f"\nplain greedy: {report['plain_tokens_per_s']:.1f} tokens/s")
    print(f"{'drafter':<18}{'vocab':>7}{'cover':>7}{'MACs/base':>10}{'obj':>5}  {'held-out top-1 (pos 1..)':<26}"
          f"{'tau':>6}{'tok/s':>7}{'speedup':>16}{'ideal':>7}  lossless")
    for name, e in report["drafters"].items():
        top1 = " ".join(f"{x:.2f}" if x is not None else "-" for x in e["heldout_top1"])
        cover = f"{100 * e['coverage']:.1f}%" if e["coverage"] is not None else "full"
        ideal = f"{e['ideal_speedup']:.2f}x" if "ideal_speedup" in e else "-"
        print(f"{name:<18}{e['draft_vocab_size'] or 'full':>7}{cover:>7}{100 * e['cost']['ratio']:>9.1f}%"
              f"{e['objective']:>5}  {top1:<26}{e['tokens_per_step']:>6.2f}{e['tokens_per_s']:>7.1f}"
              f"{e['speedup']:>9.2f}x {ci_text(e['speedup_ci95'], 6)}{ideal:>7}  {e['lossless']}")
    if extra:
        report["methods"] = {k: {m: results[k].get(m) for m in ("tokens_per_step", "tokens_per_s", "speedup", "speedup_ci95",
                                                                "speedup_per_repeat", "lossless", "by_category",
                                                                "ideal_speedup", "decoder_efficiency")}
                             for k in [*drafters, *extra]}
        print(f"\n{'method':<30}{'tau':>6}{'tok/s':>7}{'speedup':>16}{'ideal':>7}  lossless")
        for k, e in report["methods"].items():
            ideal = f"{e['ideal_speedup']:.2f}x" if e["ideal_speedup"] else "-"
            print(f"{k:<30}{e['tokens_per_step']:>6.2f}{e['tokens_per_s']:>7.1f}{e['speedup']:>9.2f}x "
                  f"{ci_text(e['speedup_ci95'], 6)}{ideal:>7}  {e['lossless']}")
        cats = sorted({c for e in report["methods"].values() for c in (e["by_category"] or {})})
        if cats:
            print(f"\nper category (tau / speedup vs plain)\n{'category':<14}"
                  + "".join(f"{k:>24}" for k in report["methods"]))
            for c in cats:
                cells = [(e["by_category"] or {}).get(c) for e in report["methods"].values()]
                print(f"{c:<14}" + "".join(f"{x['tokens_per_step']:>14.2f} / {x['speedup']:.2f}x" if x else f"{'-':>24}"
                                          for x in cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
