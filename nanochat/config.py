"""Run configuration: dataclasses hold every default; a named config file and CLI flags override them.

Precedence: dataclass default < config file (`--config NAME` = configs/NAME.toml, or a path) < explicit flags.
Flags are the field names in kebab-case; config files use the field names (snake_case or kebab-case).
Unknown keys and ill-typed values fail with a message that names the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import tomllib
from dataclasses import dataclass, field

from nanochat.common import (OUTPUT_NAME_HINT, UserError, check_name, flat_fields, from_flat_dict, nested_fields,
                             repo_root)
from nanochat.gate_rewards import ACTION_SPACES, REWARD_BASELINES, REWARDS, check_ppo_sizes, check_reward_settings
from nanochat.gpt import ACTIVATION_CHECKPOINTING, ARCHITECTURES, GPTConfig, model_dims_from_depth
from nanochat.mhc import MHCConfig
from nanochat.newton_schulz import ns_schedule, resolve_ns_coeffs
from nanochat.training import DIVERGENCE_MARGIN, DIVERGENCE_WINDOW

_MODEL = GPTConfig()  # the architecture defaults live in GPTConfig; the flags below take them from there
DIVERGENCE_HELP = (f"after the LR warm-up (if any), a loss above ln(vocab size) + {DIVERGENCE_MARGIN} for "
                   f"{DIVERGENCE_WINDOW} steps in a row is a diverging run: warn (once) | stop (an error; nothing more "
                   f"is saved) | off")
NAME_RULE = "a plain name: letters, digits, '.', '_', '-'"  # check_name's rule, said in the help of every tag


def _f(default, help: str, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


def check_choices(cfg, choices: dict):
    """Each named field must hold one of its allowed values; the error names the flag."""
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)} "
                            f"(got {getattr(cfg, name)!r})")


@dataclass
class TrainConfig:
    # logging / runtime
    run: str = _f("dummy", "wandb run name ('dummy' disables wandb)", resumable=True)
    model_tag: str = _f("", f"name of the checkpoint and results folder, {NAME_RULE} (default: the run name, or "
                        "d<depth>)", resumable=True)
    device_type: str = _f("auto", "auto | cuda | cpu", resumable=True)
    dist_timeout: float = _f(600.0, "seconds a rank waits at a collective (torchrun) before the run stops with one "
                             "line naming the rank that stopped answering (frozen, killed, node down); 0: "
                             "torch's default (30 min gloo, 10 min NCCL)", resumable=True)
    dtype: str = _f("auto", "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 (autocast)")
    compile: str = _f("auto", "torch.compile the model: auto (on CUDA only) | true | false", resumable=True)
    seed: int = _f(42, "random seed (model init and data order)")
    # model: one dial (depth) derives width and heads
    depth: int = _f(12, "number of transformer layers; width = depth * aspect_ratio rounded to head_dim")
    aspect_ratio: int = _f(64, "model width per layer")
    head_dim: int = _f(128, "attention head dimension (tiny presets use 64)")
    num_kv_heads: int = _f(0, "key/value heads for grouped-query attention (0 = as many as query heads)")
    max_seq_len: int = _f(1024, "context length in tokens")
    # Dynamic mHC: one nested MHCConfig (nanochat/mhc.py), whose fields become --mhc-<setting> flags and mhc_<setting>
    # TOML keys (common.flat_fields): an mHC option is declared there, once
    mhc: MHCConfig = field(default_factory=MHCConfig, metadata=dict(help="mHC"))
    # nGPT (--arch ngpt; README "nGPT"); defaults from GPTConfig
    arch: str = _f(_MODEL.arch, "gpt (the baseline) | ngpt (normalized Transformer: weights and hidden states on the "
                   "unit sphere)")
    scalar_alpha: bool = _f(_MODEL.scalar_alpha, "ngpt: one eigen learning rate alpha per sub-layer instead of one "
                            "per dimension")
    ngpt_alpha_init: float = _f(_MODEL.ngpt_alpha_init, "ngpt: initial alpha_A, alpha_M (NVIDIA/ngpt: 0.05)")
    logit_scale: float = _f(_MODEL.logit_scale, "ngpt: initial logit scale s_z (> 0; logits = s_z * cosines)")
    lazy_proj_freq: int = _f(1, "ngpt: renormalise the weights every N optimizer steps (1 = every step, as the "
                             "reference; >= 1)")
    ngpt_optimizer: str = _f("adamw", "ngpt: adamw (every matrix at --ngpt-lr) | muon (hidden matrices on Muon at "
                             "--matrix-lr; wte, lm_head on AdamW at --ngpt-lr)")
    ngpt_lr: float = _f(1e-3, "ngpt: AdamW LR of the matrices; alpha and the s_* scales get 0.3x it")
    # data
    data_source: str = _f("fineweb", "fineweb (FineWeb-Edu shards) | local (train splits under $NANOCHAT_DATA_DIR)")
    # batch and horizon
    device_batch_size: int = _f(32, "sequences per device per micro-step", resumable=True)
    total_batch_size: int = _f(524288, "tokens per optimizer step (gradient accumulation fills the gap)")
    num_iterations: int = _f(-1, "optimizer steps (-1: derive from --target-param-data-ratio)")
    extend_to: int = _f(0, "with --resume: train on to this many steps instead of the run's horizon (recorded as a "
                        "config change at the resume step; the LR schedule is recomputed for it, docs/design.md)",
                        resumable=True)
    target_param_data_ratio: float = _f(20.0, "tokens per parameter when --num-iterations is -1 (Chinchilla), "
                                        "counting the baseline architecture's parameters, mHC or not: baseline and "
                                        "mHC get the same token budget")
    # optimizer (nanochat's tuned d12 values)
    embedding_lr: float = _f(0.2, "AdamW LR for the token embedding (scaled by 1/sqrt(width/768))")
    unembedding_lr: float = _f(0.004, "AdamW LR for the lm_head (scaled by 1/sqrt(width/768))")
    matrix_lr: float = _f(0.02, "Muon LR for hidden matrices")
    scalar_lr: float = _f(0.5, "AdamW LR for scalar parameters (scaled by 1/sqrt(width/768))")
    mhc_lr: float = _f(0.01, "AdamW LR for the mHC parameters (phi, alpha, biases, gates, stream embedding, "
                       "read-out)")
    weight_decay: float = _f(0.0, "decoupled weight decay on the Muon matrices")
    muon_ns_coeffs: str = _f("quintic", "Muon's Newton-Schulz coefficients: a preset (quintic, cubic, polar_express5, "
                             "handover8) or a literal 'a,b,c' / JSON list of triples (nanochat/newton_schulz.py)")
    muon_ns_steps: int = _f(0, "Muon's Newton-Schulz steps; 0 = the default: 5 for one triple, the whole schedule "
                            "for a schedule (any other value must then equal its length)")
    warmup_ratio: float = _f(0.0, "fraction of steps of linear LR warmup")
    warmdown_ratio: float = _f(0.2, "fraction of steps of linear LR warmdown at the end")
    final_lr_frac: float = _f(0.0, "LR at the end of warmdown, as a fraction of the peak")
    grad_clip: float = _f(0.0, "clip the global grad norm to this value (0 = off; the norm is logged anyway)")
    # evaluation, checkpoints
    eval_every: int = _f(250, "evaluate val bpb every N steps (-1 = only at the end)", resumable=True)
    eval_tokens: int = _f(10 * 524288, "validation tokens per bpb evaluation", resumable=True)
    save_every: int = _f(1000, "save a checkpoint every N steps (-1 = only at the end)", resumable=True)
    keep_checkpoints: int = _f(2, "keep the newest K checkpoints", resumable=True)
    resume: bool = _f(False, "continue from the newest checkpoint of this model tag", resumable=True)
    log_every: int = _f(1, "print a step line every N steps", resumable=True)
    divergence_check: str = _f("warn", DIVERGENCE_HELP, resumable=True)
    # memory and speed (docs/performance.md)
    activation_checkpointing: str = _f("off", "recompute activations in backward: off | mhc (each mHC connection's "
                                       "coefficient math, read-out and mixing) | full (every sub-layer)",
                                       resumable=True)
    memory_check: str = _f("auto", "estimate the step's peak memory before training: auto (on CUDA) | true | "
                           "false; on CUDA a device batch that does not fit the GPU is refused, with the numbers",
                           resumable=True)
    peak_flops: float = _f(0.0, "bf16 peak FLOP/s of one GPU, for MFU (0: from the GPU's name, H100 SXM/PCIe/NVL, "
                           "H200, A100; other GPUs log no MFU)", resumable=True)
    mhc_log_every: int = _f(0, "mHC: every N steps (and at the end) append each sub-layer's gate, H_res diagonal, "
                            "distance from I, sum error and mean H_pre/H_post on a fixed val batch to "
                            "metrics.jsonl (0 = off)", resumable=True)
    results_dir: str = _f("results", "metrics.jsonl and config.json go to <results_dir>/<model_tag>/", resumable=True)

    def validate(self):
        check_name("--model-tag", self.model_tag, hint=OUTPUT_NAME_HINT)
        if not self.model_tag and self.run != "dummy":  # the run name is then the folder name
            check_name("--run (the folder name when --model-tag is empty)", self.run, hint=OUTPUT_NAME_HINT)
        positive = ["depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "total_batch_size",
                    "eval_tokens", "keep_checkpoints", "log_every"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        choices = dict(device_type=("auto", "cuda", "cpu"), dtype=("auto", "float32", "bfloat16"),
                       compile=("auto", "true", "false"), data_source=("fineweb", "local"),
                       activation_checkpointing=ACTIVATION_CHECKPOINTING, memory_check=("auto", "true", "false"),
                       divergence_check=("warn", "stop", "off"))
        check_choices(self, choices)
        if self.peak_flops < 0:
            raise UserError(f"--peak-flops must be >= 0 (got {self.peak_flops})")
        if self.activation_checkpointing == "mhc" and not self.mhc.enabled:
            raise UserError("--activation-checkpointing mhc recomputes the mHC connections: add --mhc-enabled, or "
                            "use full (every sub-layer)")
        if self.num_iterations == 0 or self.num_iterations < -1:
            raise UserError(f"--num-iterations must be > 0 or -1 (got {self.num_iterations})")
        if self.extend_to < 0 or (self.extend_to and not self.resume):
            raise UserError(f"--extend-to continues an existing run to N > 0 steps: it needs --resume (got "
                            f"--extend-to {self.extend_to}{'' if self.resume else ' without --resume'})")
        if self.num_iterations == -1 and self.target_param_data_ratio <= 0:
            raise UserError(f"--target-param-data-ratio must be > 0 (got {self.target_param_data_ratio})")
        for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(self, name)})")
        if self.warmup_ratio + self.warmdown_ratio > 1.0:
            raise UserError("--warmup-ratio + --warmdown-ratio must be <= 1")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "mhc_lr", "weight_decay",
                     "grad_clip"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.mhc_log_every < 0:
            raise UserError(f"--mhc-log-every must be >= 0 (got {self.mhc_log_every})")
        defaults = MHCConfig()
        mhc_set = [f"mhc_{f.name}" for f in dataclasses.fields(MHCConfig)
                   if f.name != "enabled" and getattr(self.mhc, f.name) != getattr(defaults, f.name)]
        own_defaults = {f.name: f.default for f in dataclasses.fields(self)}
        mhc_set += [name for name in ("mhc_lr", "mhc_log_every") if getattr(self, name) != own_defaults[name]]
        if mhc_set and not self.mhc.enabled:  # else the run would silently train the baseline
            flags = ", ".join("--" + name.replace("_", "-") for name in mhc_set)
            raise UserError(f"{flags} set but mHC is off: add --mhc-enabled (or drop the mHC settings)")
        if self.mhc.enabled:
            self.mhc.validate()
        self._validate_arch()
        if self.num_kv_heads < 0:
            raise UserError(f"--num-kv-heads must be >= 0 (got {self.num_kv_heads})")
        if self.muon_ns_steps < 0:
            raise UserError(f"--muon-ns-steps must be >= 0 (0 = default; got {self.muon_ns_steps})")
        try:
            ns_schedule(resolve_ns_coeffs(self.muon_ns_coeffs), self.muon_ns_steps or None)
        except UserError as e:
            raise UserError(f"--muon-ns-coeffs {self.muon_ns_coeffs!r} / --muon-ns-steps {self.muon_ns_steps}: {e}")

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig these settings train (vocab_size from the tokenizer): the depth dial derives width and
        heads; the mHC and nGPT fields carry over."""
        n_embd, n_head = model_dims_from_depth(self.depth, self.aspect_ratio, self.head_dim)
        n_kv_head = self.num_kv_heads or n_head
        if n_head % n_kv_head:
            raise UserError(f"--num-kv-heads {n_kv_head} must divide the number of query heads {n_head}")
        ngpt = dict(arch=self.arch, scalar_alpha=self.scalar_alpha, ngpt_alpha_init=self.ngpt_alpha_init,
                    logit_scale=self.logit_scale)
        return GPTConfig(sequence_len=self.max_seq_len, vocab_size=vocab_size, n_layer=self.depth, n_head=n_head,
                         n_kv_head=n_kv_head, n_embd=n_embd, mhc=dataclasses.replace(self.mhc), **ngpt)

    def _validate_arch(self):
        """The architecture flags: their values, none of another variant's set (else the run would silently train
        without them), and the combinations the chosen variant refuses (Architecture.validate_training)."""
        check_choices(self, dict(arch=tuple(ARCHITECTURES), ngpt_optimizer=("adamw", "muon")))
        if self.lazy_proj_freq < 1:
            raise UserError(f"--lazy-proj-freq must be >= 1 (1 = every step; got {self.lazy_proj_freq})")
        for name in ("logit_scale", "ngpt_alpha_init", "ngpt_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for arch in ARCHITECTURES.values():
            changed = [n for n in arch.training_flags if getattr(self, n) != defaults[n]]
            if arch.name != self.arch and changed:
                flags = ", ".join("--" + n.replace("_", "-") for n in changed)
                raise UserError(f"{flags} set but --arch is {self.arch!r}: add --arch {arch.name}")
        ARCHITECTURES[self.arch].validate_training(self)


# ---------------------------------------------------------------------------------------------------------------
# dataclass <-> argparse / TOML

def _coerce(cls, key: str, value, source: str):
    """Check a config-file value against the field's type; ints are accepted for float fields."""
    ftype = {name: f.type for name, f in flat_fields(cls)}[key]
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[ftype]
    if isinstance(value, bool) and ftype != "bool" or not isinstance(value, expected):
        raise UserError(f"{source}: key {key!r} expects a {ftype} (got {value!r})")
    if ftype == "float" and not math.isfinite(value):
        raise UserError(f"{source}: key {key!r} must be a finite number (got {value!r})")
    return float(value) if ftype == "float" else value


def finite_float(text: str) -> float:
    """argparse type for float flags: `nan < 0` is False, so a NaN or inf would pass every range check later."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
    return value


class ConfigArgumentParser(argparse.ArgumentParser):
    """argparse with the error first and short: a mistyped flag gets a "did you mean" suggestion instead of the
    whole usage (which --help still prints)."""

    def error(self, message: str):
        hint = ""
        if message.startswith("unrecognized arguments:"):
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for bad in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(bad.split("=")[0], flags, n=1, cutoff=0.6)
                if close:
                    hint += f"\n  {bad}: did you mean {close[0]}?"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n(run with --help to list every flag)\n")


def resolve_config_path(name_or_path: str) -> str:
    """`baseline` -> configs/baseline.toml; anything with a slash or a .toml suffix is a path."""
    if os.sep in name_or_path or name_or_path.endswith(".toml"):
        path = name_or_path
    else:
        path = os.path.join(repo_root(), "configs", name_or_path + ".toml")
    if not os.path.isfile(path):
        named = sorted(f[:-5] for f in os.listdir(os.path.join(repo_root(), "configs")) if f.endswith(".toml"))
        raise UserError(f"--config {name_or_path!r}: no such file {path} (named configs: {', '.join(named)})")
    return path


def load_config_file(cls, path: str, _seen: tuple = ()) -> dict:
    """Read a TOML config. `extends = "NAME"` first loads that named config (its keys are overridden here)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from e
    out = {}
    parent = raw.pop("extends", None)
    if parent is not None:
        parent_path = resolve_config_path(str(parent))
        if os.path.realpath(parent_path) in _seen + (os.path.realpath(path),):
            raise UserError(f"config file {path}: 'extends' forms a cycle through {parent_path}")
        out.update(load_config_file(cls, parent_path, _seen + (os.path.realpath(path),)))
    known = {name for name, _ in flat_fields(cls)}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"config file {path}: unknown key {key!r}")
        out[name] = _coerce(cls, name, value, f"config file {path}")
    return out


def add_dataclass_args(parser: argparse.ArgumentParser, cls):
    """One flag per setting, kebab-case, help and default taken from the dataclass (so docs cannot drift); a nested
    settings dataclass (TrainConfig.mhc) gives --<field>-<setting> flags, its help prefixed by the field's."""
    labels = {name: f.metadata.get("help", name) for name, f in
              ((f.name, f) for f in dataclasses.fields(cls)) if name in nested_fields(cls)}
    for name, f in flat_fields(cls):
        flag = "--" + name.replace("_", "-")
        label = next((f"{labels[outer]}: " for outer in labels if name.startswith(outer + "_")), "")
        help_text = f"{label}{f.metadata.get('help', '')} (default: {f.default!r})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, type={"int": int, "float": finite_float, "str": str}[f.type],
                                default=argparse.SUPPRESS, help=help_text)


def build_config(cls, argv, description: str, extra_args=None, config_help: str = ""):
    """Parse argv into an instance of `cls`. Returns (config, parsed_namespace)."""
    parser = ConfigArgumentParser(description=description, allow_abbrev=False)  # a typo must not match a prefix
    parser.add_argument("--config", default=None,
                        help=config_help or "named config in configs/ (e.g. baseline, dynamic_mhc, tiny_cpu, "
                        "tiny_cpu_mhc) or a path to a .toml file")
    if extra_args:
        extra_args(parser)
    add_dataclass_args(parser, cls)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # torchrun ... -m scripts.X -- --flag: the separator reaches us
        argv = argv[1:]
    args = parser.parse_args(argv)  # unknown flags: argparse prints the flag and exits with status 2
    values = {}
    if args.config:
        values.update(load_config_file(cls, resolve_config_path(args.config)))
    field_names = {name for name, _ in flat_fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in field_names})
    config = from_flat_dict(cls, values)
    config.validate()
    return config, args


EVAL_TASKS = ("bpb", "gsm8k", "gsm8k_8shot", "hellaswag", "arc_easy", "arc_challenge")  # = evaluate.TASKS + bpb


@dataclass
class EvalConfig:
    model_tag: str = _f("", f"model tag whose checkpoint to evaluate, {NAME_RULE} (a path: --checkpoint)")
    checkpoint: str = _f("", "path to a checkpoint directory (overrides --model-tag/--step)")
    hf: str = _f("", "evaluate a folder written by scripts.export_hf (e.g. one downloaded from the Hub) instead of "
                 "a checkpoint; transformers' logits are checked against ours first when it is installed")
    step: int = _f(-1, "checkpoint step to evaluate (-1 = the newest)")
    tasks: str = _f("bpb", f"comma-separated tasks: {', '.join(EVAL_TASKS)}, or all")
    device_type: str = _f("auto", "auto | cuda | cpu")
    dist_timeout: float = _f(600.0, "seconds a rank waits at a collective (torchrun) before the run stops with one "
                             "line naming the rank that stopped answering (frozen, killed, node down); 0: "
                             "torch's default (30 min gloo, 10 min NCCL)")
    dtype: str = _f("auto", "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 (autocast)")
    compile: str = _f("auto", "torch.compile the scoring forward (bpb, multiple choice) and generation's decode "
                      "step (static KV cache, CUDA graphs on GPU): auto (on CUDA only) | true | false")
    device_batch_size: int = _f(8, "sequences per device per forward pass (bpb rows, choices, generated rows)")
    eval_tokens: int = _f(10 * 524288, "validation tokens for bpb (per split)")
    max_per_task: int = _f(-1, "examples per downstream task: the first N after a seeded shuffle (-1 = all)")
    seed: int = _f(42, "seed of the --max-per-task subsample")
    subset: str = _f("random", "--max-per-task takes: random (seeded shuffle) | first (file order, as lm-eval's "
                     "--limit)")
    max_new_tokens: int = _f(256, "GSM8K: generation limit per problem (greedy; lm-eval's default is 256)")
    task_data: str = _f("auto", "task data: auto (HF hub, else $NANOCHAT_DATA_DIR) | hub | local")
    strict: bool = _f(False, "fail on a malformed data row instead of counting and skipping it")
    results_dir: str = _f("results", "eval.json and eval_examples.jsonl go to <results_dir>/<output_tag>/")
    output_tag: str = _f("", f"results folder name, {NAME_RULE} (default: the model tag)")
    mhc_gates: str = _f("", "evaluate an mHC model at these gates: 1 (global), L (per layer) or 2L (per sub-layer) "
                        "comma-separated values in [0, 1] (default: its learned gates)")
    mhc_gates_from: str = _f("", "evaluate at the mean gates the RL policy chose: path to a train_rl eval.json")
    inference_sinkhorn_iters: int = _f(0, "mHC: run this many Sinkhorn iterations for H_res instead of the trained "
                                       "count (0: exact; docs/performance.md measures what fewer cost)")

    def gate_values(self) -> list[float]:
        return parse_gate_values(self.mhc_gates)

    def task_list(self) -> list[str]:
        names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        return list(EVAL_TASKS) if names == ["all"] else names

    def validate(self):
        if not self.model_tag and not self.checkpoint and not self.hf:
            raise UserError("pass --model-tag (or --checkpoint PATH, or --hf DIR) to say which model to evaluate")
        if self.hf and (self.model_tag or self.checkpoint):
            raise UserError("--hf DIR evaluates an exported folder: pass it without --model-tag or --checkpoint")
        check_name("--model-tag", self.model_tag)
        check_name("--output-tag", self.output_tag, hint=OUTPUT_NAME_HINT)
        if self.hf and not self.output_tag:
            check_name("--hf", os.path.basename(os.path.normpath(self.hf)),
                       hint="its folder name becomes the results folder: pass --output-tag NAME")
        for name in ("device_batch_size", "eval_tokens", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        if self.max_per_task == 0 or self.max_per_task < -1:
            raise UserError(f"--max-per-task must be > 0 or -1 for all (got {self.max_per_task})")
        names = self.task_list()
        unknown = [t for t in names if t not in EVAL_TASKS]
        if unknown or not names:
            raise UserError(f"--tasks: unknown task(s) {', '.join(unknown) or '(none given)'} "
                            f"(known: {', '.join(EVAL_TASKS)}, all)")
        if len(set(names)) != len(names):
            raise UserError(f"--tasks: a task is listed twice ({self.tasks})")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"--dtype must be one of auto, float32, bfloat16 (got {self.dtype!r})")
        check_choices(self, dict(compile=("auto", "true", "false")))
        if self.task_data not in ("auto", "hub", "local"):
            raise UserError(f"--task-data must be one of auto, hub, local (got {self.task_data!r})")
        if self.subset not in ("random", "first"):
            raise UserError(f"--subset must be one of random, first (got {self.subset!r})")
        if self.mhc_gates and self.mhc_gates_from:
            raise UserError("pass --mhc-gates or --mhc-gates-from, not both")
        if self.mhc_gates:
            self.gate_values()


SFT_DATA = ("gsm8k", "synthetic")


def parse_gate_values(text: str, flag: str = "--mhc-gates") -> list[float]:
    """Comma-separated gate values, each in [0, 1] (how many a model takes is checked against the model)."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers in [0, 1] (got {text!r})") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise UserError(f"{flag} must be comma-separated numbers in [0, 1] (got {text!r})")
    return values


def policy_mean_gates(path: str, flag: str = "--mhc-gates-from") -> list[float]:
    """The mean gates the RL policy chose, from a train_rl eval.json (its rl_policy arm)."""
    try:
        with open(path) as f:
            values = json.load(f)["arms"]["rl_policy"]["chosen_gates"]["mean"]
        return [float(v) for v in values]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{flag} {path}: not an RL eval.json with the rl_policy arm's chosen gates "
                        f"({type(e).__name__}: {e})") from None


@dataclass
class ExportConfig:
    model_tag: str = _f("", f"model tag whose checkpoint to export, {NAME_RULE} (a path: --checkpoint)")
    checkpoint: str = _f("", "path to a checkpoint directory (overrides --model-tag/--step)")
    step: int = _f(-1, "checkpoint step to export (-1 = the newest)")
    out: str = _f("", "the folder to write (config.json, model.safetensors, tokenizer.json, README.md, ...)")
    force: bool = _f(False, "replace a non-empty --out (the old folder is removed only once the new one is complete)")
    dtype: str = _f("float32", "float32 | bfloat16: the dtype of the exported matrices and embeddings (mHC's "
                    "coefficients stay float32)")
    mhc_gates: str = _f("", "mHC: store these gates in the config: 1 (global), L (per layer) or 2L (per sub-layer) "
                        "comma-separated values in [0, 1] (default: the learned gates)")
    mhc_gates_from: str = _f("", "mHC: store the mean gates the RL policy chose: path to a train_rl eval.json")
    results_dir: str = _f("results", "where the model card reads <results_dir>/<model_tag>/eval.json")
    push_to_hub: str = _f("", "after exporting, upload the folder to this Hub repository (OWNER/NAME; private)")
    dry_run: bool = _f(False, "with --push-to-hub: list the files that would be uploaded, send nothing")

    def gate_values(self) -> list[float] | None:
        if self.mhc_gates_from:
            return policy_mean_gates(self.mhc_gates_from)
        return parse_gate_values(self.mhc_gates) if self.mhc_gates else None

    def validate(self):
        if not self.model_tag and not self.checkpoint:
            raise UserError("pass --model-tag (or --checkpoint PATH) to say which model to export")
        check_name("--model-tag", self.model_tag)
        if not self.out:
            raise UserError("pass --out DIR, the folder to write the export to")
        check_choices(self, {"dtype": ("float32", "bfloat16")})
        if self.mhc_gates and self.mhc_gates_from:
            raise UserError("pass --mhc-gates or --mhc-gates-from, not both")
        if self.mhc_gates:
            parse_gate_values(self.mhc_gates)
        if self.push_to_hub and (self.push_to_hub.count("/") != 1 or not all(self.push_to_hub.split("/"))):
            raise UserError(f"--push-to-hub {self.push_to_hub!r}: expected a Hub repository id, OWNER/NAME")
        if self.dry_run and not self.push_to_hub:
            raise UserError("--dry-run lists what --push-to-hub would upload: pass --push-to-hub OWNER/NAME too")
        return self


def parse_int_list(text: str, flag: str) -> list[int]:
    """'1,2' -> [1, 2], with an error that names the flag."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--{flag} must be comma-separated integers (got {text!r})") from None
    if not values:
        raise UserError(f"--{flag} is empty")
    return values


@dataclass
class SFTConfig:
    model_tag: str = _f("", f"model tag of the base checkpoint to fine-tune, {NAME_RULE} (a path: --checkpoint)")
    checkpoint: str = _f("", "path to a base checkpoint directory (overrides --model-tag/--step)")
    step: int = _f(-1, "base checkpoint step (-1 = the newest)")
    output_tag: str = _f("", f"model tag of the fine-tuned checkpoints, {NAME_RULE} (default: <model-tag>_sft)")
    run: str = _f("dummy", "wandb run name ('dummy' disables wandb)", resumable=True)
    device_type: str = _f("auto", "auto | cuda | cpu", resumable=True)
    dist_timeout: float = _f(600.0, "seconds a rank waits at a collective (torchrun) before the run stops with one "
                             "line naming the rank that stopped answering (frozen, killed, node down); 0: "
                             "torch's default (30 min gloo, 10 min NCCL)", resumable=True)
    dtype: str = _f("auto", "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 (autocast)")
    compile: str = _f("auto", "torch.compile the model: auto (on CUDA only) | true | false", resumable=True)
    seed: int = _f(42, "seed of the data order and the held-out split")
    # data
    data: str = _f("gsm8k,synthetic", f"comma-separated fine-tuning sources: {', '.join(SFT_DATA)} (GSM8K train "
                   "split; generated problems, nanochat/synthetic_gsm8k.py)")
    task_data: str = _f("auto", "GSM8K data: auto (HF hub, else $NANOCHAT_DATA_DIR) | hub | local")
    synthetic_count: int = _f(20000, "synthetic problems to generate")
    synthetic_seed: int = _f(0, "generator seed of the synthetic problems (RL and its evaluation use others)")
    split_seed: int = _f(0, "seed of the GSM8K train split into SFT / RL-train / RL-validation parts "
                         "(nanochat/splits.py); fine-tuning uses the SFT part only")
    synthetic_steps: str = _f("1,2", "synthetic: operations per problem, comma-separated choices")
    synthetic_max_value: int = _f(20, "synthetic: largest starting amount and operand")
    synthetic_ops: str = _f("+-", "synthetic: operations to draw from, any of + - * /")
    synthetic_mix: str = _f("", "synthetic: a named mixture of difficulty tiers (mixed: steps 1-4, + - * /, operands "
                            "up to 50; each problem labelled with its tier) instead of the three knobs above")
    val_problems: int = _f(256, "problems held out of the mixture for the validation answer loss")
    # optimisation
    device_batch_size: int = _f(16, "rows per device per step")
    num_iterations: int = _f(-1, "optimizer steps (-1: one epoch of the training rows)")
    extend_to: int = _f(0, "with --resume: train on to this many steps instead of the run's horizon (the linear "
                        "decay is recomputed for it)", resumable=True)
    lr_scale: float = _f(0.2, "learning rates = the base run's LRs x this (linear decay to 0 over the run)")
    mhc_gate_noise: float = _f(-1.0, "mHC gate noise during fine-tuning (-1: keep the base model's)")
    mhc_gate_sample_frac: float = _f(0.25, "mHC gate-range training during fine-tuning: the fraction of rows whose "
                                     "gates are drawn from U[0, 1], so the RL controller acts where the model was "
                                     "trained (-1: keep the base model's; ignored without mHC)")
    # evaluation, checkpoints
    eval_every: int = _f(100, "evaluate the validation answer loss every N steps (-1 = only at the end)",
                         resumable=True)
    save_every: int = _f(500, "save a checkpoint every N steps (-1 = only at the end)", resumable=True)
    keep_checkpoints: int = _f(2, "keep the newest K checkpoints", resumable=True)
    resume: bool = _f(False, "continue from the newest checkpoint of --output-tag", resumable=True)
    log_every: int = _f(10, "print a step line every N steps", resumable=True)
    divergence_check: str = _f("warn", DIVERGENCE_HELP, resumable=True)
    activation_checkpointing: str = _f("off", "recompute activations in backward: off | mhc (each mHC connection's "
                                       "coefficient math, read-out and mixing) | full (every sub-layer)",
                                       resumable=True)
    memory_check: str = _f("auto", "estimate the step's peak memory (rows at the full context) before training: "
                           "auto (on CUDA) | true | false; on CUDA a device batch that does not fit is refused",
                           resumable=True)
    results_dir: str = _f("results", "metrics.jsonl and config.json go to <results_dir>/<output_tag>/", resumable=True)

    def data_sources(self) -> list[str]:
        return [d.strip() for d in self.data.split(",") if d.strip()]

    def validate(self):
        if not self.model_tag and not self.checkpoint:
            raise UserError("pass --model-tag (or --checkpoint PATH) to say which base model to fine-tune")
        check_name("--model-tag", self.model_tag)
        check_name("--output-tag", self.output_tag, hint=OUTPUT_NAME_HINT)
        sources = self.data_sources()
        unknown = [d for d in sources if d not in SFT_DATA]
        if unknown or not sources:
            raise UserError(f"--data: unknown source(s) {', '.join(unknown) or '(none given)'} "
                            f"(known: {', '.join(SFT_DATA)})")
        for name in ("device_batch_size", "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        if self.num_iterations == 0 or self.num_iterations < -1:
            raise UserError(f"--num-iterations must be > 0 or -1 (got {self.num_iterations})")
        if "synthetic" in sources and self.synthetic_count <= 0:
            raise UserError(f"--synthetic-count must be > 0 with --data synthetic (got {self.synthetic_count})")
        if self.val_problems < 0:
            raise UserError(f"--val-problems must be >= 0 (got {self.val_problems})")
        if not self.lr_scale > 0:
            raise UserError(f"--lr-scale must be > 0 (got {self.lr_scale})")
        if self.extend_to < 0 or (self.extend_to and not self.resume):
            raise UserError(f"--extend-to continues an existing run to N > 0 steps: it needs --resume (got "
                            f"--extend-to {self.extend_to}{'' if self.resume else ' without --resume'})")
        for name in ("mhc_gate_noise", "mhc_gate_sample_frac"):
            v = getattr(self, name)
            if v != -1.0 and not 0 <= v <= 1:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1] or -1 (got {v})")
        parse_int_list(self.synthetic_steps, "synthetic-steps")
        check_synthetic_mix(self.synthetic_mix)
        choices = dict(device_type=("auto", "cuda", "cpu"), dtype=("auto", "float32", "bfloat16"),
                       compile=("auto", "true", "false"), task_data=("auto", "hub", "local"),
                       activation_checkpointing=ACTIVATION_CHECKPOINTING, memory_check=("auto", "true", "false"),
                       divergence_check=("warn", "stop", "off"))
        check_choices(self, choices)


RL_BASELINES = ("grid", "random", "es")


def check_synthetic_mix(name: str):
    if name:
        from nanochat.synthetic_gsm8k import MIXTURES  # the mixtures' one registry
        if name not in MIXTURES:
            raise UserError(f"--synthetic-mix must be one of {', '.join(MIXTURES)} (got {name!r})")


@dataclass
class RLConfig:
    model_tag: str = _f("", f"model tag of the frozen mHC checkpoint whose gates the controller sets, {NAME_RULE} "
                        "(a path: --checkpoint)")
    checkpoint: str = _f("", "path to an mHC checkpoint directory (overrides --model-tag/--step)")
    step: int = _f(-1, "checkpoint step (-1 = the newest)")
    tag: str = _f("", f"name of this RL run, {NAME_RULE}: results/rl/<tag>/ and checkpoints/rl/<tag>/ (default "
                  "<model-tag>-<problems>-<action-space>-<reward>, then -<algo> unless it is ppo)")
    run: str = _f("dummy", "wandb run name ('dummy' disables wandb)", resumable=True)
    device_type: str = _f("auto", "device of the frozen model: auto | cuda | cpu (the policy MLP runs on the CPU)",
                          resumable=True)
    dtype: str = _f("auto", "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 (autocast)")
    compile: str = _f("auto", "torch.compile the frozen model's scoring forward (dense reward) and the exact "
                      "reward's decode step (static KV cache, CUDA graphs on GPU): auto (on CUDA only) | true | false",
                      resumable=True)
    seed: int = _f(0, "seed of the learner, the problem sampler and the black-box baselines")
    seeds: str = _f("", "run once per seed (comma-separated; tags <tag>-s<seed>) and aggregate the arms over seeds "
                    "into <results>/rl/<tag>/seeds.json: mean, IQM and bootstrap CIs, TOST against the best black "
                    "box", resumable=True)
    algo: str = _f("ppo", "the learner: ppo (stable-baselines3, the plan's) | rloo (REINFORCE with a leave-one-out "
                   "baseline over --rloo-samples gates per problem, no critic: envs/bandit.py)")
    action_map: str = _f("sigmoid", "how policy actions become gates: sigmoid (a logit-normal policy, never clipped, "
                         "so the log-probability is the action's) | linear ([-1, 1] -> [0, 1], clipped: old runs) | "
                         "clip")
    whiten_obs: bool = _f(True, "whiten observations with the training pool's fixed mean and std")
    # the environment
    action_space: str = _f("global", "gates the controller sets: " + " | ".join(
        f"{a.name} ({a.help})" for a in ACTION_SPACES.values()))
    reward: str = _f("exact", " | ".join(f"{r.name} ({r.help})" for r in REWARDS.values()))
    mix_weight: float = _f(0.5, "w of the mix reward")
    reward_baseline: str = _f("default", "default: each reward minus the learned gates' reward on the same problem "
                              "(a per-problem control variate: same optimum, far less variance) | none: the plain "
                              "reward")
    problems: str = _f("gsm8k", "problem source: gsm8k | synthetic (generated, nanochat/synthetic_gsm8k.py)")
    train_split: str = _f("train", "GSM8K split RL trains on (train: its RL-training part, nanochat/splits.py; "
                          "model selection uses its RL-validation part)")
    split_seed: int = _f(0, "seed of the GSM8K train split into SFT / RL-train / RL-validation parts (must match "
                         "the fine-tuning run's)")
    eval_split: str = _f("test", "GSM8K split of the held-out evaluation (RL never sees it)", resumable=True)
    train_problems: int = _f(-1, "problems in the training pool (-1: the whole split; synthetic: 2048)")
    eval_problems: int = _f(-1, "held-out evaluation problems (-1: the whole split; synthetic: 512)", resumable=True)
    synthetic_seed: int = _f(1, "synthetic: generator seed of the training pool (evaluation: seed + 1, minus every "
                             "training question; fine-tuning uses seed 0)")
    synthetic_steps: str = _f("1,2", "synthetic: operations per problem, comma-separated choices")
    synthetic_max_value: int = _f(20, "synthetic: largest starting amount and operand")
    synthetic_ops: str = _f("+-", "synthetic: operations to draw from, any of + - * /")
    synthetic_mix: str = _f("", "synthetic: a named mixture of difficulty tiers (mixed: steps 1-4, + - * /, operands "
                            "up to 50; each problem labelled with its tier) instead of the three knobs above")
    task_data: str = _f("auto", "GSM8K data: auto (HF hub, else $NANOCHAT_DATA_DIR) | hub | local")
    max_new_tokens: int = _f(256, "exact reward: generation limit per problem (greedy)")
    score_batch_size: int = _f(32, "problems per batched forward / generation when scoring baselines and arms",
                               resumable=True)
    num_envs: int = _f(16, "sub-environments of the batched vec env: problems scored per PPO env step")
    val_problems: int = _f(128, "RL-validation problems (GSM8K: the train split's rl_val part; synthetic: seed + 2): "
                           "model selection and the choice of the best black box, never the held-out evaluation")
    eval_every: int = _f(1024, "score the deterministic policy on the validation problems every N timesteps and keep "
                         "the best policy (0: keep the last)", resumable=True)
    tensorboard_log: str = _f("", "directory for TensorBoard logs of PPO (SB3's tensorboard_log; empty: none)",
                              resumable=True)
    # RLOO
    rloo_samples: int = _f(4, "rloo: gate samples per problem (K; the baseline is the mean of the other K - 1)")
    rloo_problems_per_step: int = _f(16, "rloo: problems per update (each scored K times in one batched call)")
    rloo_learning_rate: float = _f(3e-3, "rloo: Adam learning rate (advantages are normalised per update)")
    # PPO (the plan's defaults, docs/design.md section 1)
    total_timesteps: int = _f(50000, "PPO's budget in problems scored (the baselines get the same)", resumable=True)
    learning_rate: float = _f(3e-4, "PPO Adam learning rate")
    n_steps: int = _f(1024, "PPO rollout size in env steps over all sub-environments (multiple of --num-envs)")
    batch_size: int = _f(64, "PPO minibatch size")
    n_epochs: int = _f(10, "PPO epochs per rollout")
    gamma: float = _f(0.99, "PPO discount (episodes are one step long, so it has no effect)")
    ent_coef: float = _f(0.1, "PPO entropy bonus (the plan's 0.1: high, for exploration)")
    net_arch: str = _f("64,64", "hidden sizes of the policy and value MLPs")
    log_std_init: float = _f(0.0, "initial log std of the Gaussian policy (SB3's 0: std 1 in [-1, 1], i.e. 0.5 in "
                             "gate units)")
    save_every: int = _f(4096, "write a policy checkpoint every N timesteps (and at the end)", resumable=True)
    keep_checkpoints: int = _f(2, "keep the newest K policy checkpoints", resumable=True)
    resume: bool = _f(False, "continue from the newest policy checkpoint of --tag", resumable=True)
    progress: bool = _f(True, "SB3's progress bar during learning", resumable=True)
    # baselines and evaluation
    baselines: str = _f("grid,random,es", "black-box baselines on the same budget: grid (global gate), random, es "
                        "(per-layer gates), or none", resumable=True)
    random_candidates: int = _f(16, "random search: candidate gate vectors", resumable=True)
    es_population: int = _f(8, "evolution strategy: candidates per generation", resumable=True)
    es_parents: int = _f(4, "evolution strategy: best candidates averaged into the next mean", resumable=True)
    es_generations: int = _f(8, "evolution strategy: generations", resumable=True)
    es_sigma: float = _f(0.2, "evolution strategy: initial mutation std (decays to a quarter)", resumable=True)
    tie_margin_dense: float = _f(1e-3, "equivalence margin of the dense reward (nats): a tie is declared only by a "
                                 "TOST within +-margin", resumable=True)
    tie_margin_accuracy: float = _f(0.01, "equivalence margin of accuracy (1 percentage point)", resumable=True)
    eval_only: bool = _f(False, "skip learning: evaluate the newest policy checkpoint of --tag (and baselines)",
                         resumable=True)
    results_dir: str = _f("results", "metrics.jsonl, baselines.json, eval.json go to <results_dir>/rl/<tag>/",
                          resumable=True)

    def validate(self):
        if not self.model_tag and not self.checkpoint:
            raise UserError("pass --model-tag (or --checkpoint PATH) of the mHC model whose gates to control")
        check_name("--model-tag", self.model_tag)
        check_name("--tag", self.tag, hint=OUTPUT_NAME_HINT)
        choices = dict(action_space=tuple(ACTION_SPACES), reward=tuple(REWARDS), problems=("gsm8k", "synthetic"),
                       algo=("ppo", "rloo"), action_map=("sigmoid", "linear", "clip"),
                       reward_baseline=REWARD_BASELINES,
                       train_split=("train", "test"), eval_split=("train", "test"),
                       device_type=("auto", "cuda", "cpu"), dtype=("auto", "float32", "bfloat16"),
                       task_data=("auto", "hub", "local"), compile=("auto", "true", "false"))
        check_choices(self, choices)
        positive = ["max_new_tokens", "score_batch_size", "num_envs", "total_timesteps", "n_steps", "batch_size",
                    "n_epochs", "save_every", "keep_checkpoints", "random_candidates", "es_population",
                    "es_parents", "es_generations", "rloo_problems_per_step"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        if not (self.tie_margin_dense > 0 and 0 < self.tie_margin_accuracy < 1):
            raise UserError(f"--tie-margin-dense must be > 0 and --tie-margin-accuracy in (0, 1) (got "
                            f"{self.tie_margin_dense}, {self.tie_margin_accuracy})")
        if self.rloo_samples < 2 or not self.rloo_learning_rate > 0 or self.val_problems < 0 or self.eval_every < 0:
            raise UserError(f"--rloo-samples must be >= 2 (got {self.rloo_samples}), --rloo-learning-rate > 0 (got "
                            f"{self.rloo_learning_rate}), --val-problems and --eval-every >= 0 (got "
                            f"{self.val_problems}, {self.eval_every})")
        for name in ("train_problems", "eval_problems"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise UserError(f"--{name.replace('_', '-')} must be > 0 or -1 (got {getattr(self, name)})")
        check_ppo_sizes(self.n_steps, self.num_envs, self.batch_size)
        if self.problems == "gsm8k" and self.train_split == self.eval_split:
            raise UserError(f"--train-split and --eval-split are both {self.train_split!r}: the evaluation must be "
                            f"on problems RL never saw")
        check_reward_settings(self.reward, self.reward_baseline, self.mix_weight)
        if not self.learning_rate > 0 or self.ent_coef < 0 or not 0 <= self.gamma <= 1 or self.es_sigma <= 0:
            raise UserError(f"PPO/ES settings out of range: --learning-rate {self.learning_rate} (> 0), --ent-coef "
                            f"{self.ent_coef} (>= 0), --gamma {self.gamma} (in [0, 1]), --es-sigma {self.es_sigma} "
                            f"(> 0)")
        self.baseline_list()
        parse_int_list(self.net_arch, "net-arch")
        if self.seeds.strip():
            parse_int_list(self.seeds, "seeds")
        parse_int_list(self.synthetic_steps, "synthetic-steps")
        check_synthetic_mix(self.synthetic_mix)

    def baseline_list(self) -> list[str]:
        names = [b.strip() for b in self.baselines.split(",") if b.strip()]
        if names == ["none"]:
            return []
        unknown = [b for b in names if b not in RL_BASELINES]
        if unknown or not names:
            raise UserError(f"--baselines: unknown baseline(s) {', '.join(unknown) or '(none given)'} "
                            f"(known: {', '.join(RL_BASELINES)}, or none)")
        return names
