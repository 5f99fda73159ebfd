"""Re-encode finished teacher data in another hidden-state format (pipeline/shards.py), e.g. to fp8
when the data set is too large for the disks or the train workers' memory:

    python -m pipeline.recode outputs/smollm2/teacher outputs/smollm2-fp8/teacher --hidden-dtype float8_e4m3

The source is verified first (checksums) and never modified. The destination is a complete teacher
directory: shards, journal, manifest and a fingerprint equal to the one a teacher stage run with
`teacher.hidden_dtype=<new>` would record, so the pipeline reuses it with that override (and refuses it
without). Re-encoding float16 data to fp8 rounds twice (fp32 -> fp16 -> fp8); the fp16 step is 2^-11
relative, far below fp8's 2^-4, so the result matches a teacher that wrote fp8 directly up to rare
ties in the last fp8 bit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from pipeline.lineage import hash_json, sha256_file
from pipeline.shards import HIDDEN_DTYPES, read_shard, write_shard


def recode(src: Path, dst: Path, hidden_dtype: str, progress: bool = True) -> dict:
    """Write `src`'s teacher data into `dst` with hidden states stored as `hidden_dtype`; returns the new
    manifest. `dst` must not hold teacher data already."""
    from tqdm.auto import tqdm

    from pipeline.teacher import (
        FINGERPRINT,
        JOURNAL,
        MANIFEST,
        SHARDS,
        _append_journal,
        _write_json,
        load_manifest,
        verify_shards,
    )

    src, dst = Path(src), Path(dst)
    if hidden_dtype not in HIDDEN_DTYPES:
        raise ValueError(f"--hidden-dtype must be one of {', '.join(HIDDEN_DTYPES)}, got {hidden_dtype!r}")
    manifest = load_manifest(src)
    problems = verify_shards(src)
    if problems:
        raise ValueError(f"{src} is damaged; finish or repair it with the teacher stage first:\n  "
                         + "\n  ".join(problems))
    if any((dst / n).exists() for n in (SHARDS, JOURNAL, MANIFEST, FINGERPRINT)):
        raise ValueError(f"{dst} already holds teacher files; pick an empty directory")
    (dst / SHARDS).mkdir(parents=True, exist_ok=True)
    fingerprint = json.loads((src / FINGERPRINT).read_text())
    fingerprint["recipe"]["teacher"]["hidden_dtype"] = hidden_dtype
    fingerprint["recipe_hash"] = hash_json(fingerprint["recipe"])
    _write_json(dst / FINGERPRINT, fingerprint)
    shards = []
    for entry in tqdm(manifest["shards"], desc="recode shards", unit="shard", disable=not progress):
        seqs = read_shard(src / SHARDS / entry["name"], manifest["hidden_size"], manifest["top_k"],
                          manifest["hidden_dtype"])
        path = dst / SHARDS / entry["name"]
        write_shard(seqs, path, hidden_dtype)
        new = {**{k: entry[k] for k in ("name", "rows", "tokens")}, "sha256": sha256_file(path)}
        _append_journal(dst, new)
        shards.append(new)
    out = {**manifest, "hidden_dtype": hidden_dtype, "shards": shards, "recipe": fingerprint["recipe"],
           "recipe_hash": fingerprint["recipe_hash"],
           "recoded_from": {"dir": str(src.resolve()), "hidden_dtype": manifest["hidden_dtype"],
                            "manifest_hash": hash_json(manifest)},
           "created_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    _write_json(dst / MANIFEST, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.recode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a finished teacher directory (<run>/teacher)")
    ap.add_argument("dst", type=Path, help="the new teacher directory (<new run>/teacher)")
    ap.add_argument("--hidden-dtype", required=True, choices=HIDDEN_DTYPES)
    args = ap.parse_args(argv)
    try:
        manifest = recode(args.src, args.dst, args.hidden_dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    before = sum((args.src / "shards" / s["name"]).stat().st_size for s in manifest["shards"])
    after = sum((args.dst / "shards" / s["name"]).stat().st_size for s in manifest["shards"])
    print(f"wrote {args.dst}: {len(manifest['shards'])} shards, {manifest['num_tokens']} tokens, "
          f"{before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({after / manifest['num_tokens']:.0f} bytes per token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
