"""Typed recipe configuration: recipes/base.yaml -> recipes/<recipe>.yaml -> command-line overrides.

Every stage receives only its own section. Unknown keys and bad values are collected and
reported together, before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class RunConfig:
    name: str = "tiny"
    output_dir: str = "outputs"  # the run lives in <output_dir>/<name>
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: ["teacher", "train", "eval"])
    ray_address: str = ""  # "" -> RAY_ADDRESS / the job's cluster if there is one, else a local Ray
    num_cpus: int = 0  # local Ray only; 0 = all cores
    # minutes the whole run may take on this machine: > 0 sizes data.train.limit (then the most it may take) to
    # fit, timed here when a fresh teacher stage starts (pipeline/estimate.py choose_budget_limit); the choice
    # is kept in the run directory (budget.json), so a rerun resumes the same data. CPU runs only; 0 = off
    budget_min: float = 0.0


@dataclass
class ModelConfig:
    # local HF directory, hub name, GGUF file (path/to/x.gguf) or GGUF inside an installed package
    # (pkg:<distribution>[/<file>.gguf]); a GGUF is converted once into cache_dir (pipeline/gguf.py)
    base_model: str = "data/tiny_base"
    cache_dir: str = ""  # converted GGUF models; "" = $DRAFTFORGE_CACHE/gguf or ~/.cache/draftforge/gguf
    revision: str = ""
    # float32 | bfloat16 | float16 | auto (bfloat16 where this machine multiplies bf16 natively, else float32;
    # resolved when the config is loaded, so the resolved config, the hashes and the manifests hold the choice)
    dtype: str = "float32"
    trust_remote_code: bool = False
    allow_untested: bool = False  # run a model family the tests do not cover (pipeline/support.py)


@dataclass
class PromptSource:
    path: str = ""  # local .jsonl/.json/.parquet/.csv(.gz) file, "humaneval", or a hub dataset name
    split: str = "train"
    subset: str = ""  # hub dataset configuration name
    field: str = "prompt"  # column holding the prompt text (or a chat `messages` list)
    category_field: str = ""  # optional column used to break eval metrics down by category
    limit: int = 0  # 0 = every prompt
    # chat corpora (sharegpt): ask only the first N user turns of a conversation (0 = every turn). Later turns
    # carry the whole conversation before them as context, which the teacher runs again for each turn: with
    # max_turn=1 the same teacher time records far more reply tokens (README: the smollm2 recipe)
    max_turn: int = 0


@dataclass
class DataConfig:
    train: PromptSource = field(default_factory=PromptSource)
    eval: PromptSource = field(default_factory=lambda: PromptSource(path="humaneval", split="test"))
    max_prompt_tokens: int = 512  # longer prompts are rejected with a clear error, never truncated silently
    chat_template: str = "auto"  # auto (the tokenizer's template if it has one) | always | never


@dataclass
class TeacherConfig:
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: int = 1  # Ray reserves these and the actor runs torch with as many threads
    batch_size: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy regeneration
    # generate: the base model regenerates every response (self-distillation; the product's default)
    # corpus: the corpus's own reply to each prompt (ShareGPT's assistant turn), run through the base model
    #   teacher-forced: no generation, ~10x more recorded tokens per second; the targets are still the base
    #   model's own next-token distributions (docs/design.md §4)
    responses: str = "generate"
    top_k: int = 32  # teacher log-probs kept per token
    shard_size: int = 64  # prompts per shard (the unit of resume)
    # storage of hidden states: float16, bfloat16, float32, float8_e4m3 (layouts: pipeline/shards.py)
    hidden_dtype: str = "float16"
    # what generates the responses (teacher.responses=generate): "hf" = transformers' batched generate().
    # The seam for a serving engine (pipeline/teacher.py ENGINES); the recording pass is always one batched
    # forward over prompt + response.
    engine: str = "hf"
    # a replica split into this many pipeline stages, each its own Ray actor with cpus_per_actor CPUs and
    # gpus_per_actor GPUs and only its slice of the layers; the recording pass streams the batches through
    # them so the stages work at the same time (pipeline/stages.py). 1 = the whole model in one actor.
    # Records teacher-forced responses (responses=corpus): generation runs in one actor.
    stages: int = 1


@dataclass
class DrafterConfig:
    exit_dim: int = 0  # 0 = 2 * hidden_size (reference default)
    num_draft_layers: int = 2
    rnn: bool = True
    horizon: int = 5  # beam length trained, including g0 (TensorRT-LLM draft_len = horizon - 1)
    # 0 = predict the full base vocabulary (the reference format); N > 0 = the N most frequent tokens of
    # the teacher responses (a draft vocabulary: a much cheaper output layer; see docs/design.md §7);
    # -1 = auto: AUTO_DRAFT_VOCAB tokens when the base vocabulary exceeds LARGE_VOCAB (Llama 3, Qwen,
    # Gemma, gpt-oss: a full-vocabulary head would cost more than a small base model), else full
    draft_vocab_size: int = -1
    head: str = "redrafter"  # the draft head type (pipeline/heads.py HEAD_TYPES)
    # the output layer's starting point: random | base_head = the base model's output embedding rows of the
    # drafter's vocabulary, read through an identity projection of h, so training starts from the base
    # model's own read-out (Medusa's head init); needs exit_dim = hidden_size (docs/design.md §1)
    init: str = "random"


LARGE_VOCAB, AUTO_DRAFT_VOCAB = 65_536, 32_768

# Settings added after teacher data, drafters and eval records were made, with the value that behaves as
# before: at that value they hash as absent (pipeline/lineage.hashed_settings), so old work is reused.
ADDED_LATER = {
    "teacher": {"responses": "generate", "engine": "hf"},
    "eval": {"hybrid_ngram": 0, "hybrid_switch": 0, "static_step": "auto", "hybrid_lookup_length": 0,
             "cpu_kernels": "stock"},
    "drafter": {"head": "redrafter", "init": "random"},
    "train": {"anchors": "all"},
    "data": {"max_turn": 0},  # a prompt source (data.train, data.eval)
}


def resolve_drafter(cfg: DrafterConfig, vocab_size: int) -> DrafterConfig:
    """`cfg` with draft_vocab_size=-1 (auto) made concrete for a base vocabulary of `vocab_size`. Everything
    that hashes, plans or builds a drafter uses the resolved value, so auto and its value are the same run."""
    if cfg.draft_vocab_size != -1:
        return cfg
    return dataclasses.replace(cfg, draft_vocab_size=AUTO_DRAFT_VOCAB if vocab_size > LARGE_VOCAB else 0)


@dataclass
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    zero_stage: int = 2
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 where this machine multiplies bf16 natively; see model.dtype)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    epochs: int = 2
    max_steps: int = 0  # 0 = as many as the epochs give
    batch_size: int = 8  # sequences per worker per step
    grad_clip: float = 1.0
    position_weight_decay: float = 1.0  # loss weight of draft position i is decay**(i-1)
    objective: str = "kl"  # kl: distill the teacher's top-k distribution | ce: the reference's hard-label CE
    # all: every anchor of every teacher sequence | on_policy: draft position i of an anchor counts in the loss
    # only where g0 .. the i-th fed token each are the teacher's argmax (the contexts greedy verification can
    # reach; with corpus replies, the corpus's tokens often are not): docs/design.md §4
    anchors: str = "all"
    heldout_fraction: float = 0.05
    log_every: int = 10
    checkpoint_every: int = 100
    # a failed worker (crash, OOM, lost node) restarts the whole worker group from the last checkpoint, at
    # most this many times per run; then the stage fails and a rerun resumes from that checkpoint
    max_failures: int = 2


TRAINING_FREE = ("prompt_lookup", "lookahead")  # the training-free baselines' method names (eval.baselines)


@dataclass
class EvalConfig:
    beam_width: int = 8
    # includes g0, like the reference. 0 = auto (greedy, W = 1): the length with the best ideal speedup on the
    # device the eval runs on, from a forward-cost curve timed there and the drafter's held-out acceptance
    # (eval/forward_cost.py choose_beam_length; docs/design.md §3.7)
    beam_length: int = 5
    max_new_tokens: int = 128
    num_prompts: int = 32  # 0 = all eval prompts
    batch_size: int = 1
    repeats: int = 2  # interleaved timing repeats (spec, plain, spec, plain, ...)
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"
    num_threads: int = 0  # CPU threads for torch; 0 = leave torch's default
    baselines: list[str] = field(default_factory=lambda: list(TRAINING_FREE))  # training-free
    # hybrid drafting (docs/design.md §3.3): N > 0 also measures "hybrid", the drafter's beams plus one
    # prompt-lookup path (the last 1..N tokens matched in prompt + output) verified in the same forward;
    # greedy or lossless sampling. The gate still judges the drafter alone ("redrafter"), which is what serving stacks run.
    hybrid_ngram: int = 0
    # m > 0: the hybrid's switch mode (greedy): where the text ends in a match of at least m tokens the lookup
    # path is verified INSTEAD of the drafter's paths, elsewhere the drafter's; the tree keeps the drafter's size
    hybrid_switch: int = 0
    # K > 0 (switch mode): in a step where every row has such a match (with K - 1 known tokens after it), verify
    # K-token lookup paths and skip the drafter, as prompt lookup copies long spans; 0 = the beam length
    hybrid_lookup_length: int = 0
    temperature: float = 0.0  # 0 = greedy (token-for-token lossless check); > 0 = sampling
    reference_compatible: bool = False  # sampling with the reference acceptance rule (NOT lossless)
    # beam search over the drafter's top-N logits, the rest set to -5e4, as the reference and TensorRT-LLM
    # do (changes beams at W > 1); 0 = search the unprocessed drafter distribution
    beam_top_logits: int = 50
    # greedy: a prompt whose output diverges from plain decoding only where the base model's two
    # candidate logits are within rounding (eval.decoder.first_divergence) still counts as lossless
    allow_numerical_ties: bool = True
    seed: int = 0  # sampling RNG seed
    # torch.compile the base model for every decoding method of the run (plain, ours, baselines):
    # none | default | reduce-overhead (CUDA graphs on CUDA) | max-autotune
    compile: str = "none"
    # greedy plain decoding and ReDrafter through the static step (eval/graphs.py, docs/design.md §3.6): on CUDA
    # the whole step is one CUDA graph per bucket. auto = on for eval.device=cuda without eval.compile | on | off
    static_step: str = "auto"
    # the base model's linear layers on a CPU (eval/cpu_kernels.py): stock = torch's default float32 path;
    # onednn = oneDNN's linear on weights reordered once (CPU, float32, eval.compile=none): every method of
    # the run uses the same layers, plain decoding included; auto = the faster of the two, timed by the eval on
    # its machine before it decodes (stock where oneDNN cannot run the model); the eval record says which ran
    cpu_kernels: str = "auto"
    # greedy: profile this many eval prompts after the timed run (eval/profile.py) to record the ideal
    # speedup (tau x plain step / verify forward) and the decoder efficiency (measured / ideal); 0 = skip
    profile_prompts: int = 3


@dataclass
class GateConfig:
    min_tokens_per_step: float = 1.5
    min_speedup: float = 1.0
    require_lossless: bool = True
    beat_training_free: bool = True  # a drafter slower than prompt lookup / lookahead has no reason to ship
    beat_incumbent: bool = True  # tau and speedup must beat the promoted drafter by more than the noise
    max_category_regression: float = 0.05  # largest relative tau drop allowed in any prompt category
    registry_dir: str = ""  # where promoted drafters are recorded; "" = <run.output_dir>/registry


@dataclass
class ResourcesConfig:
    """Assumptions of the resource plan (`--plan`, pipeline/resources.py): measure and replace them."""
    gpu_memory_gb: float = 80.0
    memory_headroom: float = 0.2  # fraction of GPU memory kept free (activations, fragmentation, CUDA context)
    teacher_tokens_per_s: float = 2000.0  # per teacher replica: generation plus the recording pass
    train_tokens_per_s: float = 50000.0  # per training GPU
    eval_tokens_per_s: float = 40.0  # plain decoding at the eval batch size


@dataclass
class TrackingConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "draftforge"
    entity: str = ""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


class ConfigError(ValueError):
    """Every problem found in a recipe + overrides, reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != "base")


def _schema_problems(node: Any, schema: type, where: str) -> list[str]:
    """Unknown keys (with the valid ones) and values that do not fit the declared types."""
    problems: list[str] = []
    if not isinstance(node, dict):
        return [f"{where or 'config'}: expected a mapping, got {node!r}"]
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            problems.append(f"unknown key '{path}'; valid keys{' of ' + where if where else ''}: "
                            f"{', '.join(fields)}")
            continue
        ftype = fields[key].type
        sub = _dataclass_of(ftype)
        if sub is not None:
            problems += _schema_problems(value, sub, path)
            continue
        try:  # let OmegaConf's own type conversion judge the value, one field at a time
            probe = OmegaConf.structured(schema)
            OmegaConf.merge(probe, {key: value})
        except OmegaConfBaseException as e:
            msg = str(e).splitlines()[0]
            problems.append(f"bad value for '{path}': {value!r} ({msg})")
    return problems


def _dataclass_of(ftype: Any) -> type | None:
    if isinstance(ftype, str):
        ftype = globals().get(ftype)
    return ftype if dataclasses.is_dataclass(ftype) else None


_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
    "data.chat_template": ("auto", "always", "never"),
    "teacher.hidden_dtype": ("float16", "bfloat16", "float32", "float8_e4m3"),
    "teacher.responses": ("generate", "corpus"),
    "teacher.engine": ("hf",),  # pipeline/teacher.py ENGINES
    "train.precision": ("fp32", "bf16", "auto"),
    "train.objective": ("kl", "ce"),
    "train.anchors": ("all", "on_policy"),
    "eval.device": ("cpu", "cuda"),
    "eval.dtype": ("float32", "bfloat16", "float16"),
    "eval.compile": ("none", "default", "reduce-overhead", "max-autotune"),
    "eval.static_step": ("auto", "on", "off"),
    "eval.cpu_kernels": ("stock", "onednn", "auto"),
    "tracking.mode": ("offline", "online", "disabled"),
}


def _value_problems(cfg: Config) -> list[str]:
    """Checks a type cannot express: ranges, choices, relations between fields."""
    p: list[str] = []
    flat = OmegaConf.to_container(OmegaConf.structured(cfg))
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        if flat[section][key] not in choices:
            p.append(f"bad value for '{dotted}': {flat[section][key]!r}; choose one of {', '.join(choices)}")
    for b in cfg.eval.baselines:
        if b not in TRAINING_FREE:
            p.append(f"bad value in 'eval.baselines': {b!r}; baselines are {', '.join(TRAINING_FREE)}")
    if cfg.eval.hybrid_switch and not (1 <= cfg.eval.hybrid_switch <= cfg.eval.hybrid_ngram and cfg.eval.temperature == 0):
        p.append(f"bad value for 'eval.hybrid_switch': {cfg.eval.hybrid_switch}; switch mode needs greedy decoding "
                 f"(eval.temperature=0) and 1 <= eval.hybrid_switch <= eval.hybrid_ngram={cfg.eval.hybrid_ngram}")
    if cfg.eval.hybrid_lookup_length and (not cfg.eval.hybrid_switch or cfg.eval.hybrid_lookup_length < 2):
        p.append(f"bad value for 'eval.hybrid_lookup_length': {cfg.eval.hybrid_lookup_length}; it is the switch mode's "
                 "lookup path length (set eval.hybrid_switch) and at least 2, or 0 (the beam length)")
    if cfg.eval.cpu_kernels == "onednn":
        from eval.cpu_kernels import onednn_problem

        why = onednn_problem(cfg.eval.device, cfg.eval.dtype, cfg.eval.compile != "none")
        if why:
            p.append(f"bad value for 'eval.cpu_kernels': onednn is a float32 CPU kernel for the eager model; it needs "
                     f"eval.device=cpu, eval.dtype=float32 and eval.compile=none ({why})")
    if cfg.eval.static_step == "on" and cfg.eval.compile != "none":
        p.append(f"'eval.static_step'=on captures the whole step itself; it is not combined with "
                 f"eval.compile={cfg.eval.compile} (set one of them)")
    if cfg.eval.hybrid_ngram < 0:
        p.append(f"bad value for 'eval.hybrid_ngram': {cfg.eval.hybrid_ngram}; use 0 (off) or the longest n-gram to match")
    elif cfg.eval.hybrid_ngram and cfg.eval.temperature > 0 and cfg.eval.reference_compatible:
        p.append("'eval.hybrid_ngram' works with greedy decoding and lossless sampling, not with "
                 "'eval.reference_compatible': set one of them off")
    if cfg.gate.beat_training_free and not cfg.eval.baselines:
        p.append("'gate.beat_training_free' needs at least one entry in 'eval.baselines'")
    for s in cfg.run.stages:
        if s not in ("teacher", "train", "eval"):
            p.append(f"bad value in 'run.stages': {s!r}; stages are teacher, train, eval")
    if cfg.run.budget_min < 0:
        p.append(f"bad value for 'run.budget_min': {cfg.run.budget_min:g}; minutes > 0, or 0 for no budget")
    elif cfg.run.budget_min and cfg.data.train.limit <= 0:
        p.append("'run.budget_min' sizes data.train.limit up to its configured value: set data.train.limit to the "
                 "most prompts the run may take (0 would load and time every prompt of the corpus)")
    positive = {
        "teacher.num_actors": cfg.teacher.num_actors, "teacher.batch_size": cfg.teacher.batch_size,
        "teacher.cpus_per_actor": cfg.teacher.cpus_per_actor, "teacher.stages": cfg.teacher.stages,
        "teacher.max_new_tokens": cfg.teacher.max_new_tokens, "teacher.top_k": cfg.teacher.top_k,
        "teacher.shard_size": cfg.teacher.shard_size, "drafter.num_draft_layers": cfg.drafter.num_draft_layers,
        "train.num_workers": cfg.train.num_workers, "train.batch_size": cfg.train.batch_size,
        "train.epochs": cfg.train.epochs, "train.lr": cfg.train.lr, "eval.beam_width": cfg.eval.beam_width,
        "eval.max_new_tokens": cfg.eval.max_new_tokens, "eval.batch_size": cfg.eval.batch_size,
        "eval.repeats": cfg.eval.repeats, "data.max_prompt_tokens": cfg.data.max_prompt_tokens,
        "train.log_every": cfg.train.log_every, "train.checkpoint_every": cfg.train.checkpoint_every,
    }
    p += [f"bad value for '{k}': {v!r}; must be > 0" for k, v in positive.items() if v <= 0]
    if cfg.drafter.draft_vocab_size < -1:
        p.append(f"bad value for 'drafter.draft_vocab_size': {cfg.drafter.draft_vocab_size}; must be >= 0 (0 = full) "
                 "or -1 (auto)")
    if 0 < cfg.drafter.draft_vocab_size <= cfg.eval.beam_width:
        p.append(f"'drafter.draft_vocab_size'={cfg.drafter.draft_vocab_size} must exceed eval.beam_width="
                 f"{cfg.eval.beam_width}")
    from pipeline.heads import HEAD_TYPES

    if cfg.drafter.init not in ("random", "base_head"):
        p.append(f"bad value for 'drafter.init': {cfg.drafter.init!r}; choose random or base_head")
    if cfg.drafter.head not in HEAD_TYPES:
        p.append(f"bad value for 'drafter.head': {cfg.drafter.head!r}; head types are {', '.join(HEAD_TYPES)}")
    if cfg.drafter.horizon < 2:
        p.append(f"bad value for 'drafter.horizon': {cfg.drafter.horizon}; must be >= 2 (g0 + at least one draft)")
    if cfg.eval.beam_length == 0:
        if cfg.eval.beam_width != 1 or cfg.eval.temperature > 0:
            p.append("'eval.beam_length'=0 (auto) chooses the length of one greedy beam: it needs eval.beam_width=1 "
                     "and eval.temperature=0")
    elif cfg.eval.beam_length < 2:
        p.append(f"bad value for 'eval.beam_length': {cfg.eval.beam_length}; must be >= 2 (g0 + at least one draft) "
                 "or 0 (auto)")
    if cfg.eval.beam_top_logits < 0:
        p.append(f"bad value for 'eval.beam_top_logits': {cfg.eval.beam_top_logits}; must be >= 0 (0 = all logits)")
    if 0 < cfg.eval.beam_top_logits < cfg.eval.beam_width:
        p.append(f"bad value for 'eval.beam_width': {cfg.eval.beam_width} beams over the top "
                 f"eval.beam_top_logits={cfg.eval.beam_top_logits} drafter logits (the reference's search) is "
                 "meaningless: the extra beams continue from logits set to -5e4")
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        p.append(f"bad value for 'train.zero_stage': {cfg.train.zero_stage}; choose 0, 1, 2 or 3")
    if cfg.eval.temperature < 0:
        p.append("bad value for 'eval.temperature': must be >= 0")
    if cfg.teacher.temperature < 0:
        p.append("bad value for 'teacher.temperature': must be >= 0")
    if cfg.teacher.responses == "corpus" and cfg.teacher.temperature > 0:
        p.append("'teacher.temperature' applies to generated responses; teacher.responses=corpus uses the corpus's "
                 "replies as written (set teacher.temperature=0)")
    res = cfg.resources
    for key in ("gpu_memory_gb", "teacher_tokens_per_s", "train_tokens_per_s", "eval_tokens_per_s"):
        if getattr(res, key) <= 0:
            p.append(f"bad value for 'resources.{key}': {getattr(res, key)!r}; must be > 0")
    if not 0 <= res.memory_headroom < 1:
        p.append(f"bad value for 'resources.memory_headroom': {res.memory_headroom!r}; must be in [0, 1)")
    if cfg.train.max_failures < 0:
        p.append(f"bad value for 'train.max_failures': {cfg.train.max_failures}; must be >= 0")
    if not 0 <= cfg.train.heldout_fraction < 1:
        p.append("bad value for 'train.heldout_fraction': must be in [0, 1)")
    from data.corpora import SHAREGPT

    for name, src in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if src.max_turn < 0:
            p.append(f"bad value for 'data.{name}.max_turn': {src.max_turn}; must be >= 0 (0 = every turn)")
        elif src.max_turn and any(part.strip() != SHAREGPT for part in src.path.split(",")):
            p.append(f"'data.{name}.max_turn' applies to the sharegpt corpus (its multi-turn conversations); "
                     f"data.{name}.path is {src.path!r}")
    if not cfg.data.train.path and "teacher" in cfg.run.stages:
        p.append("'data.train.path' is empty: the teacher stage needs training prompts")
    if not cfg.model.base_model:
        p.append("'model.base_model' is empty")
    return p


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a recipe must be a mapping of sections"])
    return data


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> tuple[str, dict, list[str]]:
    """`recipe=NAME` and dotted `a.b=value` pairs -> (recipe, nested dict, problems)."""
    recipe, problems, nested = "tiny", [], {}
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} is not of the form key=value")
            continue
        key, raw = item.split("=", 1)
        if key == "recipe":
            recipe = raw
            continue
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r} conflicts with another override")
                break
        else:
            node[parts[-1]] = value
    return recipe, nested, problems


def load_config(overrides: list[str] | None = None, recipes_dir: Path = RECIPES_DIR) -> Config:
    """Merge base -> recipe -> overrides onto the typed schema; raise ConfigError listing every problem."""
    recipe, cli, problems = parse_overrides(list(overrides or []))
    if any(c in recipe for c in "/\\") or recipe.startswith(".") or recipe.endswith(".yaml"):
        raise ConfigError([f"recipe={recipe!r}: a recipe is a name in recipes/ (e.g. recipe=tiny), not a path; "
                           "put a new recipe in recipes/ or override keys on the command line"] + problems)
    recipe_path = recipes_dir / f"{recipe}.yaml"
    if not recipe_path.is_file():
        valid = sorted(p.stem for p in recipes_dir.glob("*.yaml") if p.stem != "base")
        raise ConfigError([f"unknown recipe {recipe!r}; available recipes: {', '.join(valid)}"] + problems)
    base_path = recipes_dir / "base.yaml"
    layers = [("base", _read_yaml(base_path) if base_path.is_file() else {}),
              (recipe, _read_yaml(recipe_path)), ("overrides", cli)]
    for name, layer in layers:
        problems += [f"[{name}] {msg}" for msg in _schema_problems(layer, Config, "")]
    if problems:
        raise ConfigError(problems)
    merged: dict = {}
    for _, layer in layers:
        merged = _deep_merge(merged, layer)
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema, True)
    try:
        conf: DictConfig = OmegaConf.merge(schema, merged)
    except OmegaConfBaseException as e:  # safety net; _schema_problems should have caught it
        raise ConfigError([str(e)]) from e
    cfg: Config = OmegaConf.to_object(conf)
    problems = _value_problems(cfg)
    if problems:
        raise ConfigError(problems)
    if "auto" in (cfg.model.dtype, cfg.train.precision):
        native = native_bf16()
        if cfg.model.dtype == "auto":
            cfg.model.dtype = "bfloat16" if native else "float32"
        if cfg.train.precision == "auto":
            cfg.train.precision = "bf16" if native else "fp32"
    return cfg


def native_bf16() -> bool:
    """Whether bfloat16 matmuls beat float32 ones on this machine: a CUDA device that supports bf16, a CPU
    with AMX-BF16 tiles, or a non-Intel CPU with avx512_bf16 (AMD Zen 4 and later). Measured on this repo's
    machines (README): on an AMD EPYC with avx512_bf16 a batched SmolLM2 forward ran 3x faster in bf16; on
    an Intel Xeon with AMX bf16 training ran 2,900 tokens/s; on an Intel Xeon with avx512_bf16 but no AMX a
    (4800 x 576) @ (576 x 1536) matmul took 57 ms in bf16 against 39 in float32, and the teacher recorded
    147 tokens/s against 190. Elsewhere bf16 is emulated and slower still."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("amx_bf16") or (caps.get("avx512_bf16") and cpu_vendor() != "GenuineIntel"))


def cpu_vendor() -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, ...) from /proc/cpuinfo; "" where it is not there."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a pipeline run wrote into its directory (pipeline/layout.py)."""
    from pipeline.layout import RunLayout

    path = RunLayout(Path(run_dir)).resolved_config
    if not path.is_file():
        raise ConfigError([f"{run_dir} holds no {path.name}: is it a pipeline run directory (outputs/<run.name>)?"])
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path)))


def section_from_dict(schema: type, data: dict) -> Any:
    """Rebuild a typed section from a plain dict (e.g. inside a Ray worker)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
