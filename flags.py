"""train.py's settings: every flag with its help and default, the presets, --config files, and the
checks on the flags alone (ranges, one value per teacher), made before anything is read or written.

Order of precedence: defaults, then --preset's, then --config's, then the command line. A run's
run_config.json is a config file too (`--config OUT/run_config.json` replays a run).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import random
import sys
from dataclasses import dataclass

import yaml
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from cli import ArgumentParser
from losses import Q_FLOORS

# The KD losses, by the name --loss gives (train.py's kd_term computes each; METHOD.md 5.2-5.4).
KD_LOSS_NAMES = ("pkl", "hkl", "gold", "uld", "kl")

# Run settings that must match to --resume a run (the rest, e.g. --max-steps, may change).
# (The tables below opt out of the formatter: as sentences they read; one value a line, they don't.)
RESUME_KEYS = (
    "student", "teacher", "loss", "teacher_weight", "learn_projection", "seq_len", "batch_size",
    "grad_accum", "chunk_merge", "kd_scaling", "kd_scale_max", "kd_weight", "ce_weight", "preset",
    "data", "data_config", "split", "pack", "shuffle", "shuffle_buffer", "seed", "vocab_topk",
    "uld_topk", "hkl_threshold", "temperature", "lr", "pkl_floor", "text_field",
    "assistant_only", "student_chat_template", "teacher_chat_template", "teacher_window",
    "teacher_cache",
)  # fmt: skip
# (a resume also matches the processes, the DataLoader workers, each W file's sha256 and the local
# data's files and sizes: run_dir.fingerprint)
# Settings added since: what a run that predates them did (so that it can still be resumed).
OLDER_DEFAULTS = {
    "pkl_floor": "clamp", "assistant_only": True, "student_chat_template": None,
    "teacher_chat_template": None, "teacher_window": 0, "teacher_cache": None, "kd_scale_max": 0.0,
}  # fmt: skip
# Settings that name files or directories: a config file's "~/x" is expanded as a shell would
PATH_SETTINGS = (
    "out_dir", "student", "teacher", "projection", "projection_cache", "data", "teacher_cache",
)  # fmt: skip
# Presets build random models with the REAL tokenizers (no downloads). tiny: 2 layers, width 64,
# for CPU tests and the demo. shapes-1b-4b: Llama-3.2-1B and Qwen3-4B shapes, for GPU throughput
# (random weights: the speed of a step does not depend on them); 6 x 2,048 tokens per GPU per step
# as in the public reference run (global batch 96 on 16 GPUs).
PRESETS = {
    "tiny": dict(
        student="pkg:llama-3.2", teacher=["pkg:qwen3"], seq_len=64, batch_size=2, grad_accum=1,
        max_steps=20, lr=1e-3, min_lr=1e-4, warmup_steps=2, log_every=1, save_every=10,
        num_workers=1, teacher_window=128,
    ),
    "shapes-1b-4b": dict(
        student="pkg:llama-3.2", teacher=["pkg:qwen3"], seq_len=2048, batch_size=2, grad_accum=3,
        max_steps=20, warmup_steps=2, log_every=1, save_every=0, num_workers=4,
    ),
}  # fmt: skip
# Model shapes of the presets: (student, teacher) by preset; vocab is at least the tokenizer's.
SHAPES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256,
    ),
    "qwen3-4b": dict(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936,
    ),
}  # fmt: skip
PRESET_SHAPES = {"tiny": ("tiny", "tiny"), "shapes-1b-4b": ("llama-3.2-1b", "qwen3-4b")}
# Every numeric flag and what it must be (checked before anything is read or written).
RANGES = {
    "seq_len": (lambda v: v >= 2, "at least 2"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "grad_accum": (lambda v: v >= 1, "at least 1"),
    "max_steps": (lambda v: v >= 1, "at least 1"),
    "stop_step": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v > 0, "positive"),
    "min_lr": (lambda v: v >= 0, "0 or more"),
    "warmup_steps": (lambda v: v >= 0, "0 or more"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "betas": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "grad_clip": (lambda v: v > 0, "positive"),
    "projection_lr": (lambda v: v > 0, "positive"),
    "max_bad_steps": (lambda v: v >= 0, "0 or more"),
    "save_every": (lambda v: v >= 0, "0 (no checkpoints) or more"),
    "keep_last": (lambda v: v >= 1, "at least 1"),
    "log_every": (lambda v: v >= 1, "at least 1"),
    "num_workers": (lambda v: v >= 0, "0 or more"),
    "teacher_weight": (lambda v: v >= 0, "0 or more"),
    "kd_weight": (lambda v: v >= 0, "0 or more"),
    "kd_scale_max": (lambda v: v >= 0, "0 (no cap) or more"),
    "ce_weight": (lambda v: v >= 0, "0 or more"),
    "temperature": (lambda v: v > 0, "positive"),
    "vocab_topk": (lambda v: v >= 0, "0 (all ids) or more"),
    "uld_topk": (lambda v: v >= 0, "0 (all ids) or more"),
    "hkl_threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "teacher_cap": (lambda v: v >= 1, "at least 1"),
    "teacher_window": (lambda v: v == 0 or v >= 2, "0 (the student's window) or at least 2"),
    "shuffle_buffer": (lambda v: v >= 0, "0 (no buffer) or more"),
}


def build_parser() -> ArgumentParser:
    """Every flag, with its help and default (train.py --help), in groups."""
    p = ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    for add_flags in (_teacher_flags, _objective_flags, _data_flags, _optimizer_flags, _run_flags):
        add_flags(p)
    return p


def _teacher_flags(p: ArgumentParser) -> None:
    a = p.add_argument_group("student and teachers").add_argument
    a("--config", metavar="FILE.yaml", help="settings from a YAML file (configs/); flags win")
    a("--student", default="meta-llama/Llama-3.2-1B", help="hub name or checkpoint directory")
    a("--teacher", action="append", help="a teacher model; repeat for several")
    a(
        "--loss",
        action="append",
        choices=["auto", *KD_LOSS_NAMES, "ce"],
        help="per teacher, in --teacher order (one value: all); auto: the audit's choice "
        "(default: auto; ce without --teacher)",
    )
    a(
        "--teacher-weight",
        action="append",
        type=float,
        help="alpha_m per teacher (default: 1 / number of teachers)",
    )
    a("--projection", action="append", help="W file per teacher (default: a cached build)")
    a(
        "--teacher-cache",
        action="append",
        metavar="DIR",
        help="per teacher in --teacher order, its cache_teacher.py directory: the teacher is not "
        "loaded or run ('none': it runs)",
    )
    a(
        "--projection-cache",
        default=os.path.expanduser("~/.cache/xtoken"),
        help="where W is built once per tokenizer pair",
    )
    a("--learn-projection", action="store_true", help="learn W's weights (P-KL only)")
    a("--trust-remote-code", action="store_true", help="allow models' own code from the hub")
    a("--preset", choices=sorted(PRESETS), help="random models with the real tokenizers")


def _objective_flags(p: ArgumentParser) -> None:
    a = p.add_argument_group("objective (METHOD.md 5)").add_argument
    a(
        "--kd-scaling",
        choices=["dynamic", "static"],
        default="dynamic",
        help="dynamic: sg(CE/KD) KD + CE; static: --kd-weight KD + --ce-weight CE",
    )
    a(
        "--kd-scale-max",
        type=float,
        default=0.0,
        help="dynamic scaling's cap on CE/|KD| (0: none); METHOD.md 5.5",
    )
    a("--kd-weight", type=float, default=1.0, help="static scaling's KD weight")
    a("--ce-weight", type=float, default=1.0, help="static scaling's CE weight")
    a("--temperature", type=float, default=1.0, help="tau of every KD softmax")
    a("--vocab-topk", type=int, default=8192, help="P-KL/KL teacher subset (0: all ids)")
    a("--uld-topk", type=int, default=8192, help="ids ULD sorts (0: all)")
    a("--hkl-threshold", type=float, default=0.6, help="W weight that joins H-KL's common set")
    a(
        "--pkl-floor",
        choices=Q_FLOORS,
        default="clamp",
        help="P-KL's log of the renormalized projected q: clamp log(max(q / max(sum q, 1e-10), "
        "1e-10)) (no gradient below the floor) or add log(q / (sum q + 1e-10) + 1e-10) (a damped "
        "one); METHOD.md 5.2",
    )
    a(
        "--loss-impl",
        choices=["blocked", "plain"],
        default="blocked",
        help="blocked: each loss block by block in bounded memory (blocked.py); plain: losses.py's "
        "*_plain references on the whole logits, the equations as written (more memory; no fused "
        "head)",
    )
    a(
        "--chunk-merge",
        choices=["mean", "first"],
        default="mean",
        help="a chunk's distribution: mean over its positions, or its first position",
    )


def _data_flags(p: ArgumentParser) -> None:
    a = p.add_argument_group("data").add_argument
    a(
        "--data",
        default="OptimalScale/ClimbMix",
        help="hub dataset, or local .txt/.jsonl/.parquet files, a directory or a glob",
    )
    a("--data-config", help="hub dataset configuration (its subset name)")
    a("--split", default="train", help="hub dataset split")
    a("--text-field", default="text", help="the field that holds a document's text")
    a(
        "--no-pack",
        dest="pack",
        action="store_false",
        help="one document per window (default: documents packed into full windows)",
    )
    a(
        "--no-shuffle",
        dest="shuffle",
        action="store_false",
        help="documents in file order (default: a seeded shuffle, reseeded per epoch)",
    )
    a("--shuffle-buffer", type=int, default=10_000, help="documents each worker shuffles")
    a("--seq-len", type=int, default=2048, help="student tokens per window")
    a(
        "--teacher-window",
        type=int,
        default=2048,
        help="each teacher reads each document alone, in windows of this many of its tokens "
        "(METHOD.md 4.3: the same context whatever the student; what cache_teacher.py keeps); 0: "
        "the student's packed window, as before",
    )
    a(
        "--teacher-cap",
        type=int,
        help="teacher tokens per window (default: 2 x --seq-len + --teacher-window)",
    )
    a("--num-workers", type=int, default=2, help="DataLoader workers per rank")
    # chat data (chat.py): records with messages, or prompt and completion
    a(
        "--student-chat-template",
        metavar="FILE.jinja",
        help="chat data: the student's chat template (default: its tokenizer's)",
    )
    a(
        "--teacher-chat-template",
        metavar="FILE.jinja",
        action="append",
        help="chat data: a teacher's chat template, per teacher in --teacher order ('': its "
        "tokenizer's; default: each tokenizer's)",
    )
    a(
        "--assistant-only",
        action="store_true",
        default=True,
        help="chat data: CE and KD on the assistant's messages only (default)",
    )
    a(
        "--no-assistant-only",
        dest="assistant_only",
        action="store_false",
        default=True,
        help="chat data: CE and KD on every message's content",
    )


def _optimizer_flags(p: ArgumentParser) -> None:
    a = p.add_argument_group("optimizer (the public reference config)").add_argument
    a("--batch-size", type=int, default=4, help="sequences per rank per micro-step")
    a("--grad-accum", type=int, default=3, help="micro-steps per optimizer step")
    a("--max-steps", type=int, default=30_000, help="optimizer steps; the schedule's length")
    a(
        "--stop-step",
        type=int,
        help="end this job after step N (the schedule follows --max-steps; --resume goes on)",
    )
    a("--lr", type=float, default=5e-5, help="peak learning rate")
    a("--min-lr", type=float, default=5e-6, help="learning rate at the end of the cosine")
    a("--warmup-steps", type=int, default=300, help="linear warm-up steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW's, on matrices only")
    a("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW's")
    a("--grad-clip", type=float, default=1.0, help="clip the student's gradient norm")
    a("--projection-lr", type=float, default=1e-2, help="learning rate of a learned W")
    a("--max-bad-steps", type=int, default=5, help="non-finite steps in a row before stopping")
    a("--seed", type=int, default=1337, help="weights, data order and shuffle")
    a("--compile", action="store_true", help="torch.compile the student's and teachers' forward")
    a(
        "--attn-implementation",
        help="transformers' attention kernel for every model: sdpa, flash_attention_2 (needs the "
        "flash-attn package), eager, ... (default: transformers' choice, sdpa where it can)",
    )
    a(
        "--fused-head",
        action="store_true",
        default=True,
        help="the losses compute the student's logits block by block from its last hidden states "
        "(never [tokens, vocabulary] at once)",
    )
    a(
        "--no-fused-head",
        dest="fused_head",
        action="store_false",
        help="the student's forward builds all its logits (the losses read them)",
    )
    a("--gradient-checkpointing", action="store_true", help="recompute activations")
    a(
        "--fsdp",
        action="store_true",
        help="shard the student and the teachers over the ranks (FSDP2) instead of DDP's copies",
    )


def _run_flags(p: ArgumentParser) -> None:
    a = p.add_argument_group("run directory, checkpoints and logs").add_argument
    a("--out-dir", default="out/run", help="one run per directory")
    a("--resume", action="store_true", help="continue from the latest complete checkpoint")
    a("--overwrite", action="store_true", help="replace a previous run in --out-dir")
    a("--save-every", type=int, default=1000, help="steps between checkpoints (0: none)")
    a("--keep-last", type=int, default=3, help="checkpoints kept")
    a(
        "--save-dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="dtype of the checkpoint's model weights (the fp32 master weights are kept beside)",
    )
    a("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    a(
        "--report-to",
        nargs="+",
        choices=["none", "wandb", "tensorboard"],
        default=["none"],
        help="trackers besides metrics.jsonl",
    )
    a("--run-name", help="the run's name in the trackers (default: --out-dir's name)")
    a("--wandb-project", default="xtoken", help="Weights & Biases project")
    a("--wandb", action="store_true", help="same as --report-to wandb")
    a("--tensorboard", action="store_true", help="same as --report-to tensorboard")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help, but where the help says it already, an on/off flag's, and
    None (not set)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        on_off = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        if on_off or action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Defaults, then --preset's, then --config's, then the command line: each wins over the
    one before."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    config = last_value(argv, "--config")
    if config is not None:
        argv = config_argv(parser, config, argv) + argv
    preset = last_value(argv, "--preset")
    if preset is not None and preset not in PRESETS:
        parser.error(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if preset:  # a preset's values are defaults: --config and flags win
        parser.set_defaults(**{k: v for k, v in PRESETS[preset].items() if k != "teacher"})
    args = parser.parse_args(argv)
    if preset and args.teacher is None and args.loss != ["ce"]:
        args.teacher = PRESETS[preset]["teacher"]
    args.report_to = [r for r in dict.fromkeys(args.report_to) if r != "none"]
    args.report_to += [r for r in ("wandb", "tensorboard") if getattr(args, r)]
    args.report_to = list(dict.fromkeys(args.report_to))
    args.run_name = args.run_name or os.path.basename(os.path.abspath(args.out_dir))
    return args


def last_value(argv: list[str], flag: str) -> str | None:
    """The value of the last `flag V` or `flag=V` in argv (argparse keeps the last)."""
    value = None
    for i, x in enumerate(argv):
        if x == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif x.startswith(flag + "="):
            value = x.split("=", 1)[1]
    return value


def config_argv(parser: ArgumentParser, path: str, argv: list[str]) -> list[str]:
    """A config file's settings as flags, so that argparse checks them as it checks the command
    line. Keys are flag names (`teacher-weight` or `teacher_weight`); a list repeats a flag, and a
    repeated flag that the command line also gives is the command line's alone. A run's
    run_config.json is a config too: its "args", less --resume and --overwrite."""
    try:
        with open(path, "rb") as f:
            settings = yaml.safe_load(f.read().decode("utf-8"))
    except OSError as e:
        parser.error(f"--config {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        parser.error(
            f"--config {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start}): save it as UTF-8"
        )
    except yaml.YAMLError as e:
        parser.error(f"--config {path} is not valid YAML ({str(e).splitlines()[0]})")
    skip = set()
    if isinstance(settings, dict) and isinstance(settings.get("args"), dict):
        settings, skip = settings["args"], {"config", "resume", "overwrite"}  # a run_config.json
    if not isinstance(settings, dict):
        parser.error(f"--config {path} must map flag names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    # a key names a setting (pack: false) or its flag (no-pack: true)
    names = {
        **{f.lstrip("-").replace("-", "_"): a for a in actions.values() for f in a.option_strings},
        **actions,
    }
    given = {x.split("=", 1)[0] for x in argv if x.startswith("--")}
    tokens: list[str] = []
    for key, value in settings.items():
        name = str(key).removeprefix("--").replace("-", "_")
        if name in skip:
            continue
        if name not in names or name == "config":
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0].replace('_', '-')}?" if close else ""
            parser.error(f"--config {path}: {key!r} is not a train.py setting{hint}")
        action = names[name]
        repeated = isinstance(action, argparse._AppendAction)
        if value is None or (repeated and given & set(action.option_strings)):
            continue  # the command line's own list of it replaces the config's
        as_flag = name != action.dest  # no-pack: true gives --no-pack
        if action.dest in PATH_SETTINGS:  # out-dir: ~/runs/x, as the shell expands it
            value = [*map(expand_home, value)] if isinstance(value, list) else expand_home(value)
        tokens += flag_tokens(parser, action, value, f"--config {path}: {key}", as_flag)
    return tokens


def expand_home(value):
    """A config file's "~/x" (or "~user/x") as the shell expands it on a command line; anything
    else as it is."""
    return os.path.expanduser(value) if isinstance(value, str) else value


def as_flags(dest: str, value) -> str:
    """A setting's value as the command line gives it: `--seq-len 64`, `--teacher A --teacher
    B`, `--no-pack`, `no --learn-projection` (for messages that say which flag to change)."""
    actions = [a for a in build_parser()._actions if a.dest == dest and a.option_strings]
    if not actions:
        return f"{dest} {value}"
    on_off = [a for a in actions if isinstance(a, argparse._StoreTrueAction)]
    on_off += [a for a in actions if isinstance(a, argparse._StoreFalseAction)]
    if on_off:  # the flag whose effect the value is, given or not
        given = next((a for a in on_off if a.const == value), None)
        return given.option_strings[0] if given else f"no {on_off[0].option_strings[0]}"
    flag = actions[0].option_strings[0]
    if value is None or value == []:
        return f"no {flag}"
    if isinstance(actions[0], argparse._AppendAction):
        return " ".join(f"{flag} {v}" for v in value)
    if isinstance(value, list | tuple):
        return " ".join([flag, *map(str, value)])
    return f"{flag} {value}"


def flag_tokens(
    parser: ArgumentParser, action: argparse.Action, value, where: str, as_flag: bool = False
) -> list[str]:
    """One config value as command-line tokens for its flag (as_flag: the key was the flag's
    name, so true means "give the flag")."""
    flag = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            parser.error(f"{where}: give true or false, not {value!r}")
        on = as_flag or isinstance(action, argparse._StoreTrueAction)
        return [flag] if value == on else []
    values = value if isinstance(value, list | tuple) else [value]
    if any(isinstance(v, dict | list | tuple) for v in values):
        parser.error(f"{where}: give a value or a list of values, not {value!r}")
    if not values and action.nargs == "+":  # run_config.json's report_to: [] is "none"
        if "none" not in (action.choices or ()):
            parser.error(f"{where}: give at least one value")
        return [flag, "none"]
    if isinstance(action, argparse._AppendAction):
        return [token for v in values for token in (flag, str(v))]
    if action.nargs is None and len(values) != 1:
        parser.error(f"{where}: give one value, not a list")
    return [flag, *(str(v) for v in values)]


@dataclass
class Settings:
    """The per-teacher flags, one value per teacher."""

    teachers: list[str]
    losses: list[str]
    weights: list[float]
    projections: list[str | None]
    caches: list[str | None]  # --teacher-cache per teacher (None: the teacher runs)


def check_settings(args) -> Settings:
    """The flags on their own, before anything is read or written: ranges, and one loss, weight and
    W file per teacher."""
    for name, (ok, what) in RANGES.items():
        value = getattr(args, name)
        for v in value if isinstance(value, list | tuple) else [value]:
            if v is not None and not (math.isfinite(v) and ok(v)):
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be {what}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.resume and args.overwrite:
        raise ValueError(
            "--resume and --overwrite together: --resume continues the run in --out-dir, "
            "--overwrite replaces it; give one of them"
        )
    if args.fsdp and "RANK" not in os.environ:
        raise ValueError(
            "--fsdp shards over the processes of a torchrun job: start it with torchrun "
            "(--nproc_per_node=1 for one process)"
        )
    names = args.teacher or []
    loss_names = per_teacher(args.loss, len(names), "auto", "loss")
    if not names:
        if args.loss not in (None, ["ce"]):
            raise ValueError("--loss other than ce needs a --teacher")
        loss_names = []
    elif "ce" in loss_names:
        raise ValueError("--loss ce is the no-teacher baseline: drop --teacher or pick a KD loss")
    default_weight = 1.0 / max(1, len(names))
    weights = per_teacher(args.teacher_weight, len(names), default_weight, "teacher-weight")
    files = per_teacher(args.projection, len(names), None, "projection")
    if args.learn_projection and not loss_names.count("pkl") and "auto" not in loss_names:
        raise ValueError("--learn-projection learns W for P-KL: use it with --loss pkl")
    for path in files:
        if path and os.path.isdir(path):
            raise ValueError(f"projection file {path} is a directory: pass the W file in it")
        if path and not os.path.isfile(path):
            raise ValueError(f"projection file {path} does not exist")
    caches = [None if c in (None, "none") else c for c in args.teacher_cache or []]
    if len(caches) > len(names):
        raise ValueError(
            f"{len(caches)} --teacher-cache for {len(names)} teachers: one per teacher"
        )
    caches += [None] * (len(names) - len(caches))
    for path in caches:
        if path and not os.path.isfile(os.path.join(path, "manifest.json")):
            raise ValueError(
                f"--teacher-cache {path}: no manifest.json: make it with cache_teacher.py"
            )
    if any(caches) and not args.teacher_window:
        raise ValueError("--teacher-cache needs the teacher's own context: --teacher-window > 0")
    return Settings(names, loss_names, weights, files, caches)


def per_teacher(values: list | None, n: int, default, name: str) -> list:
    """One value per teacher: none -> default, one -> repeated, n -> as given."""
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{len(values)} values of --{name} for {n} teachers: give 1 or {n}")
    return values


def tiny_model(
    arch: str, vocab_size: int, seq_len: int, shape: str = "tiny", attention: str | None = None
):
    """A random Llama/Qwen3 of a SHAPES entry, with at least vocab_size output rows."""
    config = dict(SHAPES[shape], max_position_embeddings=max(4 * seq_len, 512))
    if attention:
        config.update(attn_implementation=attention)
    config.update(tie_word_embeddings=True, vocab_size=max(vocab_size, config.get("vocab_size", 0)))
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**config))
    return LlamaForCausalLM(LlamaConfig(**config))


def make_tiny_corpus(path: str, n_docs: int = 300, seed: int = 0) -> str:
    """The tiny preset's corpus (and the tests'), deterministic: path/part-000.jsonl with prose,
    numbers, code, CJK, emoji and accents (precomposed and combining), a few long documents, and a
    few bad records; path/note.txt, path/empty.txt and path/latin1.txt (invalid UTF-8)."""
    rng = random.Random(seed)
    cities = ["Paris", "Zürich", "São Paulo", "東京", "서울", "Kraków", "Reykjavík"]
    items = ["apple", "café au lait", "résumé", "naïve idea", "jalapen\u0303o", "cre\u0300me"]

    def doc(long_ok: bool = True) -> str:
        year, n, price = rng.randint(1900, 2030), rng.randint(2, 5000), rng.uniform(0.5, 999)
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        kind = rng.randrange(5 if long_ok else 4)
        if kind == 0:
            return (
                f"In {year}, {rng.choice(cities)} sold {n} units of {rng.choice(items)} at "
                f"${price:,.2f} each, {rng.uniform(0, 99):.1f}% more than in {year - 1}."
            )
        if kind == 1:
            return (
                f"def add_{a}(x):\n    return x + {b}  # {a} + {b} = {a + b}\n\nprint(add_{a}({n}))"
            )
        if kind == 2:
            return f"{year}年、東京の人口は{n}万人でした。价格是{price:.2f}元。😀 {a}+{b}={a + b}"
        if kind == 3:
            family = "\U0001f469\u200d\U0001f469\u200d\U0001f467"  # a ZWJ sequence
            return f"{family} in {rng.choice(cities)} 🇫🇷🇯🇵:\r\n\t{a} × {b} = {a * b}  "
        return "\n\n".join(doc(False) for _ in range(rng.randint(20, 40)))  # a long document

    os.makedirs(path, exist_ok=True)
    lines = [json.dumps({"text": doc()}, ensure_ascii=False).encode() for _ in range(n_docs)]
    bad = [
        b'{"text": ""}',
        b'{"text": "  \\n\\t "}',
        b'{"title": "no text"}',
        b"not json",
        b'{"text": "caf\xe9 in latin-1"}',
        b"",
    ]
    for k, line in enumerate(bad):
        lines.insert((k + 1) * len(lines) // (len(bad) + 1), line)
    with open(os.path.join(path, "part-000.jsonl"), "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    with open(os.path.join(path, "note.txt"), "w", encoding="utf-8") as f:
        f.write("A plain text note: 201 cats, 3.14159, naïve cafe\u0301.\n")
    open(os.path.join(path, "empty.txt"), "wb").close()
    with open(os.path.join(path, "latin1.txt"), "wb") as f:
        f.write("Déjà vu in 1999: 42 €.".encode("latin-1", errors="replace"))
    return path
