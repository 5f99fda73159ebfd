"""Benchmark a trained drafter against plain greedy decoding and the training-free baselines.

    python -m eval.bench --run-dir outputs/tiny
    python -m eval.bench --run-dir outputs/tiny --widths 1,2,4,8 --lengths 3,4,5 --batch-sizes 1,4,8 --repeats 3

Uses the run's resolved config (base model, eval prompts, lengths) and its trained drafter. In one
process, with interleaved repeats (speedups are per repeat against plain greedy, then mean ± 95%):
1. sweep (W, L): tau and speedup for every beam width and length -> the best setting for this device;
2. at the best setting: redrafter, redrafter without tree attention, redrafter at beam width 1,
   hybrid (the drafter's beams + a prompt-lookup path in one tree), prompt lookup (transformers assisted generation), lookahead decoding;
3. batch sizes: redrafter vs plain greedy at each batch size (ragged acceptance per row);
4. a step profile of the best setting (eval/profile.py).
Writes <out>/bench.json and <out>/bench.png, prints a table, and records the best setting in
<run-dir>/eval/eval_record.json when one exists.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
from pathlib import Path

import torch

from data.prompts import load_prompts, select_prompts
from eval.baselines import lookahead_generate, prompt_lookup_generate
from eval.compare import ci_text, compare, method_table
from eval.cpu_kernels import apply_cpu_kernels
from eval.decoder import compile_base, first_divergence, plain_greedy
from eval.evaluate import load_trained_drafter, with_model_answers
from eval.profile import profile_decoder
from eval.speculative import SpeculativeDecoder
from pipeline import atomic
from pipeline.base_model import load_base_model
from pipeline.config import Config, load_run_config
from pipeline.layout import RunLayout


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path, help="a pipeline run directory (outputs/<name>)")
    ap.add_argument("--widths", type=_ints, default=[1, 2, 4, 8])
    ap.add_argument("--lengths", type=_ints, default=[3, 4, 5])
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 4, 8])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0 = the run's eval.max_new_tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: the run's eval.device")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="base model and drafter dtype; default: the run's eval.dtype")
    ap.add_argument("--cpu-kernels", default=None, choices=["stock", "onednn", "auto"],
                    help="the base model's linear layers on a CPU (default: the run's eval.cpu_kernels)")
    ap.add_argument("--compile", default=None, choices=["none", "default", "reduce-overhead", "max-autotune"],
                    help="torch.compile the base model (every method uses it); default: the run's eval.compile")
    ap.add_argument("--hybrid-ngram", type=int, default=3,
                    help="the hybrid method's longest prompt-lookup n-gram (docs/design.md §3.3)")
    ap.add_argument("--out", type=Path, default=None, help="default: <run-dir>/bench")
    return ap.parse_args(argv)


def _spec(model, drafter, W, L, n, eos, tree=True, ngram=0):
    dec = SpeculativeDecoder(model, drafter, beam_width=W, beam_length=L, tree_attention=tree, ngram=ngram)
    return lambda batch: dec.generate(batch, n, eos)


@torch.inference_mode()
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = RunLayout(args.run_dir)
    cfg: Config = load_run_config(args.run_dir)
    out = args.out or run.bench
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_base_model(cfg.model, device=args.device or cfg.eval.device, dtype=args.dtype or cfg.eval.dtype)
    compile_mode = args.compile or cfg.eval.compile
    compile_base(model, compile_mode)
    kernels = apply_cpu_kernels(model, args.cpu_kernels or cfg.eval.cpu_kernels)["kernels"]
    drafter = load_trained_drafter(run.drafter, model, model.dtype)
    prompts = select_prompts(load_prompts(cfg.data.eval, tok, cfg.data.max_prompt_tokens, cfg.data.chat_template),
                             args.num_prompts, cfg.eval.seed)
    prompts = with_model_answers(prompts, model, tok, args.max_new_tokens or cfg.eval.max_new_tokens,
                                 cfg.data.max_prompt_tokens)
    n, eos = args.max_new_tokens or cfg.eval.max_new_tokens, tok.eos_token_id
    plain = lambda batch: plain_greedy(model, batch, n, eos)  # noqa: E731
    explain = functools.partial(first_divergence, model)
    device_name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor()
    report: dict = {"device": str(model.device), "device_name": device_name, "dtype": str(model.dtype),
                    "threads": torch.get_num_threads(),
                    "compile": compile_mode, "cpu_kernels": kernels,
                    # transformers' generate() keeps forward outputs that a graph replay overwrites
                    "prompt_lookup_compile": "none (eager)" if compile_mode == "reduce-overhead" else compile_mode,
                    "num_prompts": len(prompts), "max_new_tokens": n, "repeats": args.repeats}

    print(f"[1/4] sweep W in {args.widths} x L in {args.lengths}")
    settings = {f"W{W}L{L}": (W, L) for W in args.widths for L in args.lengths}  # label -> (W, L)
    sweep_methods = {"plain": plain} | {k: _spec(model, drafter, W, L, n, eos) for k, (W, L) in settings.items()}
    sweep = compare(sweep_methods, prompts, 1, args.repeats, explain=explain)
    best = max(settings, key=lambda k: sweep[k]["speedup"])
    W, L = settings[best]
    report["sweep"] = {k: _slim(v) | (dict(zip(("beam_width", "beam_length"), settings[k])) if k in settings else {})
                       for k, v in sweep.items()}
    report["best_setting"] = {"beam_width": W, "beam_length": L, "speedup": sweep[best]["speedup"],
                              "tokens_per_step": sweep[best]["tokens_per_step"]}

    print(f"[2/4] baselines at the best setting W={W} L={L}")
    methods = {"plain": plain, "redrafter": _spec(model, drafter, W, L, n, eos),
               "redrafter_no_tree": _spec(model, drafter, W, L, n, eos, tree=False),
               "redrafter_W1": _spec(model, drafter, 1, L, n, eos),
               "hybrid": _spec(model, drafter, W, L, n, eos, ngram=args.hybrid_ngram),
               "prompt_lookup": lambda b: prompt_lookup_generate(model, b, n, eos),
               "lookahead": lambda b: lookahead_generate(model, b, n, eos)}
    report["methods"] = {k: _slim(v) for k, v in compare(methods, prompts, 1, args.repeats, explain=explain).items()}

    print(f"[3/4] batch sizes {args.batch_sizes}")
    report["batches"] = {}
    for bs in args.batch_sizes:
        r = compare({"plain": plain, "redrafter": _spec(model, drafter, W, L, n, eos)}, prompts, bs, args.repeats)
        report["batches"][bs] = _slim(r["redrafter"]) | {"plain_tokens_per_s": r["plain"]["tokens_per_s"]}
    report["max_batch_size_where_faster"] = max_batch_size_where_faster(report["batches"])

    print("[4/4] step profile")
    report["profile"] = profile_decoder(SpeculativeDecoder(model, drafter, W, L), [p.input_ids for p in prompts[:6]], n, eos)

    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_bench(report, args.widths, args.lengths, out / "bench.png")
    from pipeline.tracking import open_run

    tracker = open_run(cfg.tracking, args.run_dir, name=f"{cfg.run.name}-bench", job_type="bench", group=cfg.run.name,
                       config={"bench": {k: str(v) for k, v in vars(args).items()}})
    log_bench_tables(tracker, report, out / "bench.png")
    tracker.finish()
    record_path = run.eval_record
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        record["best_setting"] = report["best_setting"] | {"device": report["device"], "dtype": report["dtype"],
                                                           "device_name": device_name, "threads": report["threads"],
                                                           "compile": compile_mode, "cpu_kernels": kernels,
                                                           "max_batch_size_where_faster":
                                                               report["max_batch_size_where_faster"]}
        atomic.write_json(record_path, record)
    for serving in update_serving_batch_limit(run.export, W, L, report):
        print(f"updated {serving}: faster than plain decoding up to batch size {report['max_batch_size_where_faster']}")
    print_report(report)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return report


def max_batch_size_where_faster(batches: dict[int, dict]) -> int:
    """The largest measured batch size up to which every measured batch size beats plain decoding at the
    same batch size (0: not even the smallest)."""
    limit = 0
    for bs in sorted(batches):
        if batches[bs]["speedup"] <= 1.0:
            break
        limit = bs
    return limit


def update_serving_batch_limit(export_root: Path, W: int, L: int, report: dict) -> list[Path]:
    """Write the measured batch sizes into the run's exported serving.json files that serve this (W, L) (the
    gate's export knows only the eval's own batch size); returns the files updated."""
    updated = []
    for serving_path in sorted(Path(export_root).glob("*/serving.json")):
        serving = json.loads(serving_path.read_text())
        if (serving.get("beam_width"), serving.get("beam_length")) != (W, L):
            continue
        serving["measured"]["batch_sizes"] = {
            str(bs): {"speedup": v["speedup"], "speedup_ci95": v["speedup_ci95"], "tokens_per_step": v["tokens_per_step"]}
            for bs, v in sorted(report["batches"].items())}
        serving["measured"]["batch_sizes_from"] = "python -m eval.bench"
        serving["max_batch_size_where_faster"] = report["max_batch_size_where_faster"]
        atomic.write_json(serving_path, serving)
        updated.append(serving_path)
    return updated


def _slim(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "decode_stats"}


def print_report(report: dict) -> None:
    print(f"\n== sweep ({report['device']} {report.get('device_name', '')} {report.get('dtype', '')}, "
          f"{report['threads']} threads, compile {report.get('compile', 'none')}, "
          f"{report['num_prompts']} prompts, "
          f"{report['max_new_tokens']} new tokens, {report['repeats']} interleaved repeats) ==")
    print("\n".join(method_table(report["sweep"], name_width=22, verified=True)))
    b = report["best_setting"]
    print(f"best: W={b['beam_width']} L={b['beam_length']}\n\n== methods at the best setting ==")
    print("\n".join(method_table(report["methods"], name_width=22, verified=True)))
    print(f"\n== batch sizes (redrafter vs plain at the same batch size) ==\n{'batch':<22}{'tau':>6}{'tok/s':>10}{'speedup':>17}")
    for bs, v in report["batches"].items():
        print(f"{bs:<22}{v['tokens_per_step']:>6.2f}{v['tokens_per_s']:>10.0f}{v['speedup']:>9.2f}x {ci_text(v['speedup_ci95'])}")
    p = report["profile"]
    print(f"\n== step profile W={p['beam_width']} L={p['beam_length']}: {p['spec_step_ms']:.2f} ms/step "
          f"(plain step {p['plain_step_ms']:.2f} ms), tau {p['tokens_per_step']:.2f} ==")
    for phase, ms in p["ms_per_step"].items():
        print(f"  {phase:<20}{ms:>7.2f} ms  {100 * p['share'][phase]:>5.1f}%")
    if "speedup_bounds" in p:
        b, c = p["speedup_bounds"], p["cost_ratio"]
        print(f"  speedup = tau x plain step / step: {b['as_measured']:.2f}x as measured, "
              f"{b['free_drafter']:.2f}x with a free drafter, {b['base_forward_only']:.2f}x with only the base forward")
        print(f"  drafter MACs per draft / base MACs per token: {c['drafter_macs_per_draft'] / 1e6:.2f}M / "
              f"{c['base_macs_per_token'] / 1e6:.2f}M = {c['ratio']:.2f} (x {c['drafts_per_step']} drafts per step)")


def log_bench_tables(tracker, report: dict, plot: Path) -> None:
    """The sweep, the baselines and the batch sizes as W&B tables (one row per setting), and the plot as an
    image, in the run's W&B group (job type "bench"); nothing for a NullRun (tracking.mode=disabled)."""
    from pipeline.tracking import NullRun

    if isinstance(tracker, NullRun):
        return
    import wandb

    columns = ["setting", "beam_width", "beam_length", "batch_size", "tau", "tokens_per_s", "speedup", "speedup_ci95",
               "lossless"]

    best = report["best_setting"]

    def table(rows: dict, batch_sizes: bool = False):
        t = wandb.Table(columns=columns)
        for key, m in rows.items():
            W, L = (best["beam_width"], best["beam_length"]) if batch_sizes else (m.get("beam_width"), m.get("beam_length"))
            t.add_data(str(key), W, L, int(key) if batch_sizes else 1, m["tokens_per_step"], m["tokens_per_s"],
                       m["speedup"], m["speedup_ci95"], str(m["lossless"]))
        return t

    logged = {"bench/sweep": table(report["sweep"]), "bench/methods": table(report["methods"]),
              "bench/batch_sizes": table(report["batches"], batch_sizes=True)}
    if plot.is_file():
        logged["bench/plot"] = wandb.Image(str(plot))
    tracker.log(logged)
    tracker.summary.update({"bench/best_speedup": best["speedup"], "bench/best_beam_width": best["beam_width"],
                            "bench/best_beam_length": best["beam_length"]})


def plot_bench(report: dict, widths: list[int], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for L in lengths:
        rows = [report["sweep"][f"W{W}L{L}"] for W in widths]
        ax1.errorbar(widths, [r["speedup"] for r in rows], yerr=[r["speedup_ci95"] or 0.0 for r in rows],
                     marker="o", capsize=3, label=f"redrafter L={L}")
        ax2.plot(widths, [r["tokens_per_step"] for r in rows], marker="o", label=f"redrafter L={L}")
    for name, style in (("prompt_lookup", "--"), ("lookahead", ":")):
        m = report["methods"][name]
        ax1.axhline(m["speedup"], linestyle=style, color="gray", label=name)
        ax2.axhline(m["tokens_per_step"], linestyle=style, color="gray", label=name)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set(xscale="log", xticks=widths, xticklabels=widths, xlabel="beam width W", ylabel="speedup vs plain greedy")
    ax2.set(xscale="log", xticks=widths, xticklabels=widths, xlabel="beam width W", ylabel="tau (tokens/step)")
    for ax in (ax1, ax2):
        ax.minorticks_off()  # only the measured widths are labelled
    ax1.legend(fontsize=7)
    fig.suptitle(f"{report['device']} {report['dtype']}, {report['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
