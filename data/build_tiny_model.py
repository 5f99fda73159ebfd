"""Build the tiny base model the repo ships: a small Llama trained on Python's standard library.

    python -m data.build_tiny_model --out data/tiny_base --minutes 30

Steps (all offline):
1. Split the standard library's .py files by a hash of their path into the base-model corpus,
   a held-out validation set (held-out loss) and a held-out prompt pool that the base model never
   sees (the tiny recipe's drafter-training prompts come from it: `data/tiny/train_prompts.jsonl`).
2. Train a byte-level BPE tokenizer (`tokenizers`) on the corpus.
3. Train a `LlamaForCausalLM` on packed token windows for a fixed time budget.
4. Save it with `save_pretrained` (bf16 weights, so the committed model stays small), the tokenizer,
   the prompt file and a README with the measured held-out loss.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def stdlib_files() -> list[Path]:
    """Every .py file of this interpreter's standard library (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "__pycache__" in rel:
            continue
        files.append(path)
    return files


def split_of(path: Path) -> str:
    """Deterministic split by file path: 'train' (90%), 'val' (5%), 'prompts' (5%)."""
    rel = path.relative_to(sysconfig.get_paths()["stdlib"]).as_posix()
    bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else ("val" if bucket < 95 else "prompts")


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=2048
    )


def encode_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def prompts_from(text: str, source: str, max_chars: int, rng: random.Random) -> list[dict]:
    """Code prefixes that end right after a `def` signature (and its docstring when it has one),
    with some preceding context: the HumanEval shape, taken from held-out stdlib files."""
    lines = text.splitlines(keepends=True)
    out = []
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped.startswith("def ") or not line.rstrip().endswith(":"):
            continue
        end = i + 1
        if end < len(lines) and lines[end].lstrip().startswith(('"""', "'''")):
            quote = lines[end].lstrip()[:3]
            j = end
            if lines[end].count(quote) >= 2:
                end += 1
            else:
                j = end + 1
                while j < len(lines) and quote not in lines[j]:
                    j += 1
                end = j + 1
        start = max(0, i - rng.randint(2, 12))
        prompt = "".join(lines[start:end])
        if 40 <= len(prompt) <= max_chars:
            out.append({"prompt": prompt, "source": source, "line": i + 1})
    return out


def write_model_card(out: Path, stats: dict, sample: str) -> None:
    a = stats["args"]
    card = f"""# tiny_base: the repo's own tiny code model

A {stats['parameters'] / 1e6:.2f}M-parameter `LlamaForCausalLM` with its own {a['vocab']}-token byte-level BPE
tokenizer, trained from scratch on Python's standard library source. It is the base model of the
`tiny` recipe and of the tests; weights are stored in bf16 (load with `dtype=torch.float32` on CPU).

Built by (about {a['minutes']:.0f} minutes on 2 CPU cores):

    python -m data.build_tiny_model --out data/tiny_base --minutes {a['minutes']:g}

- corpus: every `.py` file of the interpreter's standard library, split by a hash of the path:
  {stats['files']['train']} files for training ({stats['train_tokens']:,} tokens), {stats['files']['val']} held out for the loss
  below ({stats['heldout_tokens']:,} tokens), {stats['files']['prompts']} held out as the drafter's prompt pool
  (`data/tiny/train_prompts.jsonl`; never seen by this model)
- architecture: hidden {a['hidden']}, {a['layers']} layers, {a['heads']} heads ({a['kv_heads']} KV heads), MLP {a['intermediate']},
  tied embeddings, context trained at {a['seq_len']} tokens
- training: AdamW lr {a['lr']} (warm-up, cosine over the time budget), batch {a['batch']} x {a['seq_len']} tokens,
  {stats['steps']} steps, {stats['tokens_seen']:,} tokens seen, seed {a['seed']}
- held-out loss: **{stats['heldout_loss']:.3f}** nats/token (perplexity {stats['heldout_ppl']:.1f})

Greedy continuation of a code prompt:

```python
{sample}
```
"""
    (out / "README.md").write_text(card)


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    model.eval()
    n = min(max_windows, (len(stream) - 1) // seq_len)
    losses = []
    for k in range(0, n, 16):
        rows = [stream[j * seq_len : (j + 1) * seq_len] for j in range(k, min(n, k + 16))]
        batch = torch.stack(rows)
        losses.append(model(input_ids=batch, labels=batch).loss.item() * len(rows))
    model.train()
    return sum(losses) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/tiny_base")
    ap.add_argument("--prompts-out", default="data/tiny/train_prompts.jsonl")
    ap.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)

    splits: dict[str, list[tuple[Path, str]]] = {"train": [], "val": [], "prompts": []}
    for path in stdlib_files():
        text = read_text(path)
        if text:
            splits[split_of(path)].append((path, text))
    print({k: len(v) for k, v in splits.items()}, "files")

    t0 = time.time()
    tokenizer = train_tokenizer([t for _, t in splits["train"]], args.vocab)
    print(f"tokenizer trained in {time.time() - t0:.0f}s, vocab {len(tokenizer)}")
    train_stream = encode_stream(tokenizer, [t for _, t in splits["train"]])
    val_stream = encode_stream(tokenizer, [t for _, t in splits["val"]])
    print(f"corpus: {len(train_stream):,} train tokens, {len(val_stream):,} held-out tokens")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget_s = args.minutes * 60
    warmup = 100
    step, t_start, tokens_seen = 0, time.time(), 0
    model.train()
    while True:
        elapsed = time.time() - t_start
        if elapsed > budget_s:
            break
        # cosine on wall-clock progress, so the schedule ends when the budget does
        frac = min(1.0, elapsed / budget_s)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_stream) - args.seq_len - 1, (args.batch,))
        batch = torch.stack([train_stream[s : s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch.numel()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {tokens_seen / (time.time() - t_start):.0f} tok/s "
                  f"elapsed {elapsed / 60:.1f} min", flush=True)
        if step % 1000 == 0:
            print(f"  held-out loss {eval_loss(model, val_stream, args.seq_len):.3f}", flush=True)

    val = eval_loss(model, val_stream, args.seq_len, max_windows=256)
    print(f"done: {step} steps, {tokens_seen:,} tokens, held-out loss {val:.3f} (ppl {math.exp(val):.1f})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.to(torch.float32)
    sample_prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    ids = tokenizer(sample_prompt, return_tensors="pt").input_ids
    sample = tokenizer.decode(model.generate(ids, max_new_tokens=64, do_sample=False)[0])
    stats = {
        "parameters": n_params, "steps": step, "tokens_seen": tokens_seen, "minutes": args.minutes,
        "train_tokens": len(train_stream), "heldout_tokens": len(val_stream),
        "heldout_loss": round(val, 4), "heldout_ppl": round(math.exp(val), 2), "args": vars(args),
        "files": {k: len(v) for k, v in splits.items()},
    }
    (out / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_model_card(out, stats, sample)
    print(sample)

    prompts = []
    for path, text in splits["prompts"]:
        rel = path.relative_to(sysconfig.get_paths()["stdlib"]).as_posix()
        prompts.extend(prompts_from(text, rel, 800, rng))
    rng.shuffle(prompts)
    prompts_path = Path(args.prompts_out)
    prompts_path.parent.mkdir(parents=True, exist_ok=True)
    with prompts_path.open("w") as f:
        for row in prompts[:2000]:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {min(len(prompts), 2000)} prompts to {prompts_path}")
    print(json.dumps({k: v for k, v in stats.items() if k != "args"}))


if __name__ == "__main__":
    main()
