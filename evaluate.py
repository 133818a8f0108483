r"""Evaluate checkpoints on the paper's five benchmarks with lm-evaluation-harness and set the
numbers beside the paper's table (X-Token, arXiv:2605.21699).

    python evaluate.py --model base=meta-llama/Llama-3.2-1B --model pkl=out/qwen-pkl/step_30000 \
        --paper-row base=base --paper-row pkl=pkl-qwen
    python evaluate.py --paper        # the paper's table alone

--out-dir (default out/) receives results.md (also printed), results.csv, results.png,
raw/LABEL.json (lm-eval's own output per model) and cache/ (one file per model x task, so a rerun
resumes where an interrupted one stopped and never redoes a finished task).

--dtype auto (the default) evaluates each checkpoint in the dtype its config.json names (a bf16
checkpoint in bf16, an fp32 one in fp32). --model-args, --gen-kwargs and --apply-chat-template
reach lm-eval as its own flags do, and are part of each cached result's key. --devices spreads
the models over one worker process per device, which hand their results back through cache/ and
raw/; the parent writes the one table:

    python evaluate.py --model a=out/a/step_30000 --model b=out/b/step_30000 --devices 2 \
        --model-args attn_implementation=sdpa
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import errno
import functools
import gc
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import lm_eval
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from lm_eval.api.model import LM
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_arg_string, handle_non_serializable
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from cli import atomic_write

# -----------------------------------------------------------------------------
# The paper's numbers (docs/paper_results.md): Llama-3.2-1B student, 3-shot, percent.

# The formatter leaves these tables alone: their columns stay aligned, as the paper prints them.
# fmt: off
PAPER_COLUMNS = ("MMLU", "GSM8k", "MATH", "Winogrande", "HellaSwag")
PAPER_SCORES = {  # row id (for --paper-row): the five columns, then Avg as printed
    "base":         (32.05,  5.69, 5.48, 61.48, 65.08, 33.96),
    "cpt":          (40.50, 10.25, 6.90, 61.60, 63.90, 36.63),
    "kl-llama3b":   (43.83, 12.89, 8.16, 62.70, 64.42, 38.40),
    "gold-qwen":    (42.56,  2.56, 4.50, 62.95, 62.59, 35.03),
    "pkl-qwen":     (44.67, 15.54, 7.96, 63.46, 62.63, 38.85),
    "gold-phi":     (43.50, 16.50, 7.80, 62.60, 62.92, 38.66),
    "hkl-phi":      (43.93, 19.11, 8.32, 61.87, 62.67, 39.18),
    "two-teachers": (46.32, 20.39, 9.02, 63.30, 63.38, 40.48),
}
PAPER_SETTINGS = {  # row id: (setting, teacher, loss)
    "base":         ("Base model, no training", "-", "-"),
    "cpt":          ("Continued pre-training", "-", "CE only"),
    "kl-llama3b":   ("Same tokenizer", "Llama-3.2-3B", "KL"),
    "gold-qwen":    ("Cross-tokenizer", "Qwen3-4B", "GOLD"),
    "pkl-qwen":     ("Cross-tokenizer", "Qwen3-4B", "P-KL (learned W)"),
    "gold-phi":     ("Cross-tokenizer", "Phi-4-mini", "GOLD"),
    "hkl-phi":      ("Cross-tokenizer", "Phi-4-mini", "H-KL"),
    "two-teachers": ("Two teachers", "Phi-4-mini (H-KL, 0.8) + Llama-3.2-3B (KL, 0.2)", "-"),
}
# fmt: on
PAPER_AVG_ONLY = [  # ablations reported only as averages: (experiment, setting, Avg)
    ("ULD alone", "Qwen3-4B", "36.77"),
    ("Loss swap", "Qwen3-4B with H-KL", "35.30"),
    ("Loss swap", "Phi-4-mini with P-KL", "37.50"),
    ("Fixed vs learned W", "Qwen3-4B, P-KL, W fixed", "38.37"),
    ("Fixed vs learned W", "Qwen3-4B, P-KL, W learned", "38.85"),
    ("Loss weighting", "dynamic sg(CE/KD) scaling", "36.39"),
    ("Loss weighting", "best of three static weightings", "35.92-36.27"),
    ("Teacher weighting", "static (Llama-3B 0.2, Phi-4-mini 0.8)", "40.48"),
    ("Teacher weighting", "adaptive (CE / entropy / max-prob)", "40.16-40.21"),
    ("Teacher pairing", "Phi-4-mini + Qwen3-4B", "38.49"),
]

# Which lm-eval 0.4.13 task, and which key of its results ("metric,filter"), fills each column.
TASK_METRICS = {
    # group of 57 subjects; lm-eval's aggregate weights each subject by its size
    "mmlu": ("MMLU", "acc,none"),
    # base models rarely end with "#### N" (strict-match); flexible-extract takes the last number
    "gsm8k": ("GSM8k", "exact_match,flexible-extract"),
    # Minerva prompt with worked solutions; answers normalized (\boxed{}), 7 subjects size-weighted
    "minerva_math": ("MATH", "exact_match,none"),
    # both fillings are scored on the same suffix, so plain acc is the standard figure
    "winogrande": ("Winogrande", "acc,none"),
    # endings differ in length; acc_norm (log-likelihood per byte) is the figure papers report
    "hellaswag": ("HellaSwag", "acc_norm,none"),
}
DEFAULT_TASKS = ",".join(TASK_METRICS)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
LABEL = re.compile(r"[A-Za-z0-9][\w.-]*")  # labels name files under --out-dir
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2, no traceback. Not cli.py's
    error path (cli.one_line_errors: any ValueError or OSError, "error: ..."): here a ValueError
    is not bad input (in a cell, a failed cell and exit 1; elsewhere, a bug's traceback), and the
    line reads "evaluate.py: error: ..." with any newline in it made a space (main)."""


DTYPES = ("auto", "bfloat16", "float16", "float32")  # what both the hf and vllm backends take
DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
WORKER_DEVICE = re.compile(r"cpu|cuda:\d+")  # what --devices lists
# lm-eval model arguments that evaluate.py sets from a flag of its own: one place to give each
OWN_MODEL_ARGS = {
    "pretrained": "--model",
    "dtype": "--dtype",
    "batch_size": "--batch-size",
    "device": "--device or --devices",
}
WORKER = "--worker-job"  # argv[1] of the processes that --devices starts (not a user flag)


# -----------------------------------------------------------------------------
# Flag values with a range, checked as the command line is parsed (before any work, --paper too).


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def fewshot_count(text: str) -> int:
    n = whole_number(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (solved examples), got {n}")
    return n


def limit_value(text: str) -> int | float:
    """lm-eval reads a limit < 1 as a fraction of each task, >= 1 as a count of examples."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a count >= 1 or a fraction in (0, 1), got {text!r}"
        )
    if value >= 1:
        if not value.is_integer():
            raise argparse.ArgumentTypeError(
                f"a count of examples must be a whole number, got {text!r}"
            )
        return int(value)
    return value


def batch_size_value(text: str) -> int | str:
    """An int >= 1, "auto" (largest that fits), or "auto:N" (lm-eval re-finds it N times)."""
    if text == "auto":
        return text
    auto = text.startswith("auto:")
    try:
        n = int(text.removeprefix("auto:"))
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, auto or auto:N, got {text!r}")
    return text if auto else n


def key_values(text: str) -> dict[str, Any]:
    """KEY=VALUE,... read as lm-eval's own command line reads it (true/false, None, numbers;
    'quoted' stays text)."""
    pairs: dict[str, Any] = {}
    for item in text.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not (eq and key.isidentifier() and value):
            raise argparse.ArgumentTypeError(f"takes KEY=VALUE,KEY=VALUE..., got {item!r}")
        if key in pairs:
            raise argparse.ArgumentTypeError(f"names {key!r} twice")
        pairs[key] = handle_arg_string(value)
    return pairs


def model_args_value(text: str) -> dict[str, Any]:
    pairs = key_values(text)
    own = next((key for key in pairs if key in OWN_MODEL_ARGS), None)
    if own:
        raise argparse.ArgumentTypeError(f"{own!r} has a flag of its own: {OWN_MODEL_ARGS[own]}")
    return pairs


def devices_value(text: str) -> list[str]:
    """N (the first N CUDA devices) or a list of cpu and cuda:N, one worker process each."""
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError("a count of CUDA devices must be >= 1")
        return [f"cuda:{i}" for i in range(int(text))]
    devices = [d.strip() for d in text.split(",")]
    bad = next((d for d in devices if not WORKER_DEVICE.fullmatch(d)), None)
    if bad is not None:
        raise argparse.ArgumentTypeError(
            f"takes a count N (cuda:0 to cuda:N-1) or a list of cpu and cuda:N, got {bad!r}"
        )
    return devices


class Parser(argparse.ArgumentParser):
    """Not cli.ArgumentParser (which exits with "error: ... (see PROG --help)"): a UsageError,
    so main's one except reports a bad flag in the words of every other bad input."""

    def error(self, message: str):  # argparse's own prints the usage too: one line, exit 2
        raise UsageError(f"{message} (python evaluate.py --help lists the flags)")


# -----------------------------------------------------------------------------
# Input checks, cheapest first, so a typo fails in a second rather than after the model loads.


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        label, _, rest = value.partition("=")
        if not rest:
            raise UsageError(f"{flag} takes LABEL=VALUE, got {value!r}")
        if not LABEL.fullmatch(label) or label in pairs:
            raise UsageError(f"{flag} label {label!r} must be unique and use only [A-Za-z0-9._-]")
        pairs[label] = rest
    return pairs


def check_model(label: str, path: str) -> None:
    p, where = Path(path).expanduser(), f"--model {label}={path}"
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UsageError(f"{where}: not a model (no config.json); give a save_pretrained dir")
        if not any((p / name).is_file() for name in TOKENIZER_FILES):
            raise UsageError(f"{where}: no tokenizer in it; add one with tokenizer.save_pretrained")
        if not (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))):
            raise UsageError(f"{where}: config.json but no weights (*.safetensors) in it")
        for weights in sorted(p.glob("*.safetensors")):
            problem = safetensors_problem(weights)
            if problem:
                raise UsageError(f"{where}: {weights.name} {problem}; save the checkpoint again")
    # A hub id is org/name; "out/step_1" where out/ exists here is a mistyped local path.
    elif p.exists() or not HUB_ID.fullmatch(path) or Path(path.split("/")[0]).is_dir():
        raise UsageError(f"{where}: not a model: no such directory and not a hub id like org/name")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file, from its header alone (no tensor is read), or
    None: a file cut short or damaged fails here in a second, not as a failed row."""
    try:
        with safe_open(str(path), "pt") as f:
            empty = not list(f.keys())
    except (OSError, SafetensorError) as e:
        return f"is not a readable safetensors file (damaged or cut short: {one_line(e)})"
    return "holds no tensors" if empty else None


def check_out_dir(out_dir: Path) -> None:
    # Look without creating anything, so a run that fails a later check leaves no trace.
    parent = out_dir.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write to --out-dir {out_dir} ({parent} is not a writable dir); choose another"
        )


def check_device(device: str | None, backend: str) -> None:
    if device is None:
        return
    if backend != "hf":
        raise UsageError(
            f"--device is for the hf backend; {backend} places the model itself "
            "(pick GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if not DEVICE.fullmatch(device):
        raise UsageError(f"--device {device!r}: use cpu, cuda, cuda:N or mps")
    if device == "cpu":
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("--device mps: no MPS device here; use --device cpu")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UsageError(f"--device {device}: no CUDA device here; use --device cpu")
    if int(device.partition(":")[2] or 0) >= count:
        raise UsageError(f"--device {device}: this machine has cuda:0 to cuda:{count - 1}; use one")


def check_devices(args: argparse.Namespace) -> None:
    if args.devices is None:
        return
    if args.device is not None:
        raise UsageError("--device places one process, --devices several: give one of them")
    if args.backend != "hf" and "cpu" in args.devices:
        raise UsageError(f"--devices cpu is for the hf backend; {args.backend} runs on cuda:N")
    cuda = sorted({int(d.partition(":")[2]) for d in args.devices if d.startswith("cuda")})
    count = torch.cuda.device_count() if cuda and torch.cuda.is_available() else 0
    if cuda and cuda[-1] >= count:
        here = f"cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
        raise UsageError(f"--devices: cuda:{cuda[-1]} is not here (this machine has {here})")


def check_hub_model(label: str, model: str) -> None:
    """A hub id must be reachable now (or cached, offline), not a row of "failed" after hours."""
    if Path(model).expanduser().is_dir():
        return
    where = f"--model {label}={model}"
    try:
        hf_hub_download(model, "config.json")  # what loading reads first; cached after this
    except GatedRepoError:
        raise UsageError(
            f"{where}: gated; accept its terms on huggingface.co/{model}, then hf auth login"
        ) from None
    except RepositoryNotFoundError:
        raise UsageError(f"{where}: no such model on the hub (private? hf auth login)") from None
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise UsageError(
                f"{where}: not in the local hub cache and HF_HUB_OFFLINE is set; "
                f"download it first (hf download {model}) or unset HF_HUB_OFFLINE"
            ) from None
        raise UsageError(
            f"{where}: the hub is unreachable and the model is not in the local cache; "
            "check the network (or HF_ENDPOINT), or give a local checkpoint dir"
        ) from None
    except EntryNotFoundError:
        raise UsageError(
            f"{where}: the hub repo has no config.json: not a transformers model"
        ) from None
    except HFValidationError as e:
        raise UsageError(f"{where}: not a valid hub id: {one_line(e)}") from None
    except OSError as e:
        raise UsageError(f"{where}: cannot reach it on the hub: {one_line(e)}") from None


def check_outputs(
    out_dir: Path, models: dict[str, str], tasks: list[str], args: argparse.Namespace
) -> None:
    """Nothing stands where a file or directory will be written (os.replace cannot put a file
    over a directory): checked before the evaluation, not found after it."""
    for path in (out_dir, out_dir / "cache", out_dir / "raw"):
        if path.exists() and not path.is_dir():
            raise UsageError(
                f"--out-dir {out_dir}: {path} is a file, not a directory; "
                "move it or choose another --out-dir"
            )
    files = [out_dir / name for name in ("results.md", "results.csv", "results.png")]
    files += [out_dir / "raw" / f"{label}.json" for label in models]
    files += [cache_path(model, task, args)[1] for model in models.values() for task in tasks]
    for path in files:
        if path.exists() and not path.is_file():
            raise UsageError(
                f"--out-dir {out_dir}: {path} is a directory, not a file; "
                "move it or choose another --out-dir"
            )


def write_error(path: Path, e: OSError, resume: bool) -> UsageError:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    todo = "free some space" if full else "choose another --out-dir"
    done = " (finished tasks are cached: rerunning resumes)" if resume else ""
    return UsageError(f"cannot write {path}: {e.strerror or one_line(e)}; {todo}{done}")


def prepare_out_dir(out_dir: Path) -> None:
    """Make the output dirs and open an unnamed file in each: a read-only or full --out-dir fails
    here, after every input check and before the evaluation (os.access trusts root and modes)."""
    for path in (out_dir, out_dir / "cache", out_dir / "raw"):
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path) as f:
                f.write(b"x")
                f.flush()
        except OSError as e:
            raise write_error(path, e, resume=False) from None


def check_backend(backend: str, tasks: list[str]) -> None:
    # Say so now rather than as a "failed" cell after hours of MMLU.
    need = {"hf": "accelerate", "vllm": "vllm"}[backend]
    if importlib.util.find_spec(need) is None:
        raise UsageError(f"the {backend} backend needs {need}: pip install 'lm-eval[{backend}]'")
    wants_math = any(t.startswith("minerva_math") for t in tasks)
    if wants_math and importlib.util.find_spec("math_verify") is None:
        raise UsageError("minerva_math needs math_verify: pip install 'lm-eval[math]' (or drop it)")


@functools.cache
def task_manager(include_paths: tuple[str, ...]) -> TaskManager:
    # Indexing every task YAML takes seconds: once per process (the tests call main() often).
    return TaskManager(include_path=list(include_paths) or None)


def check_tasks(tasks: list[str], include_paths: list[str]) -> None:
    for path in include_paths:
        if not Path(path).is_dir():
            raise UsageError(f"--include-path {path} is not a directory of lm-eval task YAMLs")
    if not tasks:
        raise UsageError(f"--tasks is empty; the paper's are {DEFAULT_TASKS}")
    twice = next((task for task in tasks if tasks.count(task) > 1), None)
    if twice:
        raise UsageError(f"--tasks names {twice!r} twice; give each task once")
    known = task_manager(tuple(include_paths)).all_tasks
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=5)
            hint = "close matches: " + ", ".join(close) if close else "list them: lm-eval ls tasks"
            raise UsageError(f"unknown task {task!r}; {hint}")


# -----------------------------------------------------------------------------
# Evaluation: one simple_evaluate call per model x task, so each result is cached on its own.


def model_fingerprint(model: str) -> str:
    """Changes when any file of a checkpoint directory is rewritten (name, size, mtime)."""
    p = Path(model)
    if not p.is_dir():
        return f"hub:{model}"  # no local files to look at: the id is all we know
    files = [f for f in p.iterdir() if f.is_file()]
    stats = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of --model-args, --gen-kwargs and --apply-chat-template that are set: they
    change results, so they are part of each cache key; unset ones are left out, so results
    cached before these flags existed still resume."""
    chat = args.apply_chat_template
    settings = {
        "model_args": args.model_args,
        "gen_kwargs": args.gen_kwargs,
        "apply_chat_template": chat,
        "fewshot_as_multiturn": chat,  # lm-eval's default with a chat template
    }
    return {name: value for name, value in settings.items() if value}


def cache_path(model: str, task: str, args: argparse.Namespace) -> tuple[dict, Path]:
    key = {
        "model": str(Path(model).resolve()) if Path(model).is_dir() else model,
        "fingerprint": model_fingerprint(model),
        "task": task,
        "num_fewshot": args.num_fewshot,
        "limit": args.limit,
        "backend": args.backend,
        "dtype": args.dtype,
        "lm_eval": importlib.metadata.version("lm_eval"),
    } | run_settings(args)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return key, Path(args.out_dir) / "cache" / f"{task}-{digest}.json"


def read_cache(path: Path, key: dict, task: str) -> tuple[dict | None, str]:
    """(lm-eval's output, "") from a cache file that holds a result, else (None, why not)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # truncated, unreadable
        return None, f"is unreadable ({one_line(e)})"
    if not (
        isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("raw"), dict)
    ):
        return None, "is not a cache entry of this model x task"
    value, why = score(task, entry["raw"])
    if value == "failed":
        return None, f"holds no result ({why})"
    return entry["raw"], ""


def load_lm(model: str, args: argparse.Namespace) -> LM:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or ("auto" if device.startswith("cuda") else 8)
    extra = {"batch_size": batch_size, "device": device if args.backend == "hf" else None}
    # dtype "auto" reaches from_pretrained as is: the checkpoint's config.json names the dtype
    own = {"pretrained": model, "dtype": args.dtype}
    with weights_must_match():
        return get_model(args.backend).create_from_arg_obj(own | args.model_args, extra)


class CheckpointMismatch(Exception):
    """A checkpoint whose config.json does not match its weights: transformers would evaluate it
    with the config's weights that the checkpoint lacks drawn at random, and the checkpoint's
    weights that the config has no place for dropped (a warning, then a score)."""


@contextlib.contextmanager
def weights_must_match():
    """While a model loads with transformers (the hf backend): a load that leaves a weight of the
    config missing from the checkpoint (randomly initialized), a weight of the checkpoint unused,
    or a weight of another shape raises CheckpointMismatch, a row of "failed" cells that says so.
    transformers' load report (5.x: modeling_utils.log_state_dict_report, which receives what it
    found) only warns about the first two. Older transformers have no such report: no check."""
    import transformers.modeling_utils as modeling

    report = getattr(modeling, "log_state_dict_report", None)
    if report is None:
        yield
        return

    def strict(*args, **kwargs):
        names = (
            "model",
            "pretrained_model_name_or_path",
            "ignore_mismatched_sizes",
            "loading_info",
        )
        given = dict(zip(names, args)) | kwargs
        info, model = given.get("loading_info"), given.get("model")
        problems = [
            f"{len(keys)} {what} ({', '.join(sorted(map(str, keys))[:3])}"
            + (", ...)" if len(keys) > 3 else ")")
            for what, keys in (
                (
                    "weights the config names are not in the checkpoint (they would be random)",
                    getattr(info, "missing_keys", ()),
                ),
                (
                    "weights of the checkpoint fit nowhere in it (they would be dropped)",
                    getattr(info, "unexpected_keys", ()),
                ),
                (
                    "weights have another shape in the checkpoint",
                    [k for k, *_ in getattr(info, "mismatched_keys", ())],
                ),
            )  # fmt: skip
            if keys
        ]
        if problems:
            config = getattr(model, "config", None)
            kind = getattr(config, "model_type", None) or type(model).__name__
            raise CheckpointMismatch(
                f"its config.json ({kind}) does not match its weights: {'; '.join(problems)}; "
                "fix config.json or evaluate the checkpoint it belongs to"
            )
        return report(*args, **kwargs)

    modeling.log_state_dict_report = strict
    try:
        yield
    finally:
        modeling.log_state_dict_report = report


def one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:240]


def cached_results(
    label: str, model: str, tasks: list[str], args: argparse.Namespace, pbar: tqdm
) -> tuple[dict[str, dict], dict[str, tuple[dict, Path]]]:
    """(lm-eval's output of each task cached, {task: (cache key, cache file)} of the others)."""
    raw, todo = {}, {}
    for task in tasks:
        key, cached = cache_path(model, task, args)
        entry, why = read_cache(cached, key, task) if cached.exists() else (None, "")
        if entry is not None:
            raw[task] = entry
            pbar.write(f"{label} / {task}: cached")
            pbar.update(1)
            continue
        if why:  # a result that is not there is evaluated again, never shown as "failed" for good
            warning = f"evaluate.py: warning: {label} / {task}: cache file {cached} {why}"
            pbar.write(f"{warning}; evaluating it again", file=sys.stderr)
        todo[task] = (key, cached)
    return raw, todo


def evaluate_task(lm: LM, task: str, args: argparse.Namespace) -> dict:
    """lm-eval's output for one task, made JSON (what the cache and raw/LABEL.json hold)."""
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=task_manager(tuple(args.include_path)),
        log_samples=False,  # per-sample logs of MMLU alone run to hundreds of MB
        gen_kwargs=args.gen_kwargs or None,
        apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.apply_chat_template,
    )
    if not isinstance(out, dict):
        raise RuntimeError(f"lm-eval returned {out!r}, not results")
    return json.loads(json.dumps(out, default=handle_non_serializable))


def print_traceback() -> None:
    """The exception being handled, with its full traceback, on stderr above the progress bar:
    a failure shown as a "failed" cell is never a hidden bug."""
    with tqdm.external_write_mode(file=sys.stderr):
        traceback.print_exc()


def evaluate_model(
    label: str, model: str, tasks: list[str], args: argparse.Namespace, pbar: tqdm, run_id: str
) -> dict[str, dict]:
    """lm-eval's output per task, from the cache where there; {"error": why} where it failed."""
    raw, todo = cached_results(label, model, tasks, args, pbar)
    lm, load_error = None, None
    if todo:  # load the model once, and only when some task is not cached yet
        try:
            lm = load_lm(model, args)
        except CheckpointMismatch as e:  # said in full in its one line: no traceback
            load_error = f"model did not load: {e}"
        # Any exception: a model that does not load (bad weights, out of memory, a backend's own
        # error type) is a row of "failed" cells, and the other models' rows still get written;
        # the traceback goes to stderr, so a bug is not hidden.
        except Exception as e:
            print_traceback()
            load_error = f"model did not load: {one_line(e)}"
    for task, (key, cached) in todo.items():
        pbar.set_postfix_str(f"{label}: {task}")
        if load_error:  # not cached: the next run retries
            raw[task] = {"error": load_error}
            pbar.write(f"{label} / {task}: failed: {load_error}")
            pbar.update(1)
            continue
        try:
            raw[task] = evaluate_task(lm, task, args)
        # Any exception: one broken task (a missing data file, a task YAML lm-eval rejects, a
        # metric that raises) must not cost the rest of the table; its cell says "failed" and the
        # exit status is 1. The traceback goes to stderr, so a bug is not hidden.
        except Exception as e:
            print_traceback()
            raw[task] = {"error": one_line(e)}  # not cached: the next run retries
            pbar.write(f"{label} / {task}: failed: {raw[task]['error']}")
        else:
            value, why = score(task, raw[task])
            if value == "failed":  # not cached either
                pbar.write(f"{label} / {task}: failed: {why}")
            else:  # outside the try: a full disk stops the run (one line), it is no task failure
                write_atomic(cached, json.dumps({"key": key, "raw": raw[task]}))
        pbar.update(1)
    if lm is not None:
        del lm  # free the card before the next model loads
        gc.collect()
        torch.cuda.empty_cache()

    raw = {task: raw[task] for task in tasks}
    write_record(label, model, raw, args, run_id)
    return raw


def write_record(
    label: str, model: str, raw: dict[str, dict], args: argparse.Namespace, run_id: str
) -> None:
    """raw/LABEL.json; "run" tells the parent of --devices workers that it is this run's."""
    record = {"label": label, "model": model, "num_fewshot": args.num_fewshot, "limit": args.limit}
    record |= run_settings(args) | {"run": run_id, "tasks": raw}
    write_atomic(Path(args.out_dir) / "raw" / f"{label}.json", json.dumps(record))


def read_record(label: str, tasks: list[str], args: argparse.Namespace, run_id: str) -> dict | None:
    """raw/LABEL.json's results when this run's worker wrote it whole, else None."""
    try:
        record = json.loads((Path(args.out_dir) / "raw" / f"{label}.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(record, dict) and record.get("run") == run_id
    raw = record.get("tasks") if ok else None
    if not (isinstance(raw, dict) and all(isinstance(raw.get(t), dict) for t in tasks)):
        return None
    return {task: raw[task] for task in tasks}


# -----------------------------------------------------------------------------
# --devices: one worker process per device, each evaluating its share of the models one at a time.
# The cache is the handoff: a worker writes cache entries and raw/LABEL.json as it goes, so a run
# stopped anywhere resumes, and the parent reads them once the workers have exited.


def has_work(model: str, tasks: list[str], args: argparse.Namespace) -> bool:
    for task in tasks:
        key, cached = cache_path(model, task, args)
        if not cached.exists() or read_cache(cached, key, task)[0] is None:
            return True
    return False


def worker_env(device: str, cpu_workers: int) -> dict[str, str]:
    """The environment of a worker on device: its one GPU as cuda:0 (CUDA_VISIBLE_DEVICES, which
    vllm obeys too), or a share of the cores when several workers run on the CPU."""
    env = dict(os.environ)
    if device.startswith("cuda:"):
        index = int(device.partition(":")[2])
        visible = env.get("CUDA_VISIBLE_DEVICES")  # cuda:N counts what the user made visible
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
    elif cpu_workers > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_workers))
    return env


def worker_command(job: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), WORKER, json.dumps(job)]


def exit_text(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"


def run_workers(
    models: dict[str, str], tasks: list[str], args: argparse.Namespace, run_id: str
) -> dict[str, str]:
    """Evaluate the models that have work left on args.devices, one process per device; wait for
    all. Returns {label: why} for the models of a worker that exited with an error."""
    pending = [label for label, model in models.items() if has_work(model, tasks, args)]
    devices = args.devices[: len(pending)]
    shares = {i: pending[i :: len(devices)] for i in range(len(devices))}
    cpu_workers = devices.count("cpu")
    procs = []
    try:
        for i, device in enumerate(devices):
            print(f"{device}: {', '.join(shares[i])}", flush=True)
            hf_device = "cpu" if device == "cpu" else "cuda:0"  # the one GPU it sees
            job = {
                "args": vars(args) | {"device": hf_device if args.backend == "hf" else None},
                "models": {label: models[label] for label in shares[i]},
                "tasks": tasks,
                "run": run_id,
                "position": i,
                "name": device,
            }
            env = worker_env(device, cpu_workers)
            procs.append(subprocess.Popen(worker_command(job), env=env, stdin=subprocess.DEVNULL))
        codes = [proc.wait() for proc in procs]
    finally:  # interrupted (Ctrl-C) or failed to start one: leave no worker running
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lost = {}
    for i, code in enumerate(codes):
        if code != 0:
            for label in shares[i]:
                lost[label] = f"the worker on {devices[i]} {exit_text(code)} (see its stderr)"
    return lost


def collect(
    models: dict[str, str],
    tasks: list[str],
    args: argparse.Namespace,
    run_id: str,
    lost: dict[str, str],
) -> dict[str, dict[str, dict]]:
    """Each model's results as the workers left them: raw/LABEL.json when this run's worker wrote
    it, else the cache, with the tasks neither holds failed (and raw/LABEL.json rewritten)."""
    raws = {}
    with tqdm(total=len(models) * len(tasks), desc="collecting", unit="task") as pbar:
        for label, model in models.items():
            record = read_record(label, tasks, args, run_id)
            if record is not None:
                raws[label] = record
                pbar.update(len(tasks))
                continue
            raw, todo = cached_results(label, model, tasks, args, pbar)
            why = lost.get(label, "no worker evaluated it")
            for task in todo:
                raw[task] = {"error": why}
                pbar.write(f"{label} / {task}: failed: {why}")
                pbar.update(1)
            raws[label] = {task: raw[task] for task in tasks}
            write_record(label, model, raws[label], args, run_id)
    return raws


def work(job_text: str) -> int:
    """A --devices worker: evaluate_model for each model of its share, one at a time."""
    try:
        job = json.loads(job_text)
    except ValueError:
        raise UsageError(f"{WORKER} is how --devices starts its workers, not a flag") from None
    args, tasks = argparse.Namespace(**job["args"]), job["tasks"]
    total = len(job["models"]) * len(tasks)
    with tqdm(total=total, desc=job["name"], unit="task", position=job["position"]) as pbar:
        for label, model in job["models"].items():
            evaluate_model(label, model, tasks, args, pbar, job["run"])
    return 0


def score(task: str, raw: dict) -> tuple[float | str, str]:
    """(accuracy in percent, the metric read), or ("failed", why)."""
    if "error" in raw:
        return "failed", str(raw["error"])
    results = raw.get("results")
    metrics = results.get(task) if isinstance(results, dict) else None
    if not isinstance(metrics, dict):
        return "failed", f"lm-eval reported no results for {task}"
    if task in TASK_METRICS:
        metric = TASK_METRICS[task][1]
    else:  # a local task: the first metric it reports, in its YAML's order
        metric = next((k for k in metrics if "," in k and "_stderr" not in k), "?")
    value = metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        got = "" if value is None else f" (got {value!r})"
        return "failed", f"lm-eval reported no {metric} for {task}{got}"
    return 100.0 * value, metric


# -----------------------------------------------------------------------------
# Output. A table is {row label: {column: percent, or "failed", or "-" where the paper has none}}.


def column_of(task: str) -> str:
    return TASK_METRICS[task][0] if task in TASK_METRICS else task


def row_avg(cells: dict[str, float | str]) -> tuple[float | None, str]:
    """Plain mean of the numeric cells; the text adds "(n/m)" when only n of m are numbers."""
    values = [v for v in cells.values() if isinstance(v, float)]
    if not values:
        return None, "-"
    avg = sum(values) / len(values)
    partial = f" ({len(values)}/{len(cells)})" if len(values) < len(cells) else ""
    return avg, f"{avg:.2f}{partial}"


def fmt(v: float | str) -> str:
    return f"{v:.2f}" if isinstance(v, float) else v


def settings_note(args: argparse.Namespace) -> str:
    """What run_settings holds, for the notes: ", model-args k=v,..., chat template"."""
    note = ""
    for flag in ("model_args", "gen_kwargs"):
        pairs = getattr(args, flag)
        if pairs:
            note += f", {flag.replace('_', '-')} " + ",".join(f"{k}={v}" for k, v in pairs.items())
    return note + (", chat template, few-shot as turns" if args.apply_chat_template else "")


def dtype_of(raw: dict[str, dict]) -> str:
    """The dtype lm-eval evaluated the model in, as its results record it: " (bfloat16)"."""
    for result in raw.values():
        config = result.get("config")
        dtype = config.get("model_dtype") if isinstance(config, dict) else None
        if isinstance(dtype, str):
            return f" ({dtype.removeprefix('torch.')})"
    return ""


def render_markdown(table: dict[str, dict], columns: list[str], notes: list[str]) -> str:
    lines = ["| Model | " + " | ".join(columns) + " | Avg |", "|---" * (len(columns) + 2) + "|"]
    for label, cells in table.items():
        row = [label, *(fmt(cells[c]) for c in columns), row_avg(cells)[1]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(["# Results", "", *lines, "", *notes]) + "\n"


def render_csv(table: dict[str, dict], columns: list[str], paths: dict[str, str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "path", *columns, "Avg", "avg_over"])
    for label, cells in table.items():
        avg, _ = row_avg(cells)
        n = sum(isinstance(v, float) for v in cells.values())
        cols = [fmt(cells[c]) for c in columns]
        avg_cols = ["" if avg is None else f"{avg:.2f}", f"{n}/{len(cells)}"]
        writer.writerow([label, paths.get(label, "arXiv:2605.21699"), *cols, *avg_cols])
    return buf.getvalue()


def render_chart(table: dict[str, dict], columns: list[str], title: str) -> bytes | None:
    """Grouped bars, one group per column plus Avg; the paper's rows hatched beside ours."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = [*columns, "Avg"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width, color = 0.8 / len(table), -1
    for i, (label, cells) in enumerate(table.items()):
        values = [cells[c] if isinstance(cells[c], float) else math.nan for c in columns]
        avg = row_avg(cells)[0]
        values.append(math.nan if avg is None else avg)
        xs = [g + (i - (len(table) - 1) / 2) * width for g in range(len(groups))]
        paper = label.startswith("paper: ")  # the model's colour, hatched: read as a pair
        color += 0 if paper else 1
        style = {"hatch": "//", "alpha": 0.5} if paper else {}
        ax.bar(xs, values, width, label=label, color=f"C{color % 10}", **style)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def paper_markdown() -> str:
    lines = ["| Row | Setting | Teacher | Loss | " + " | ".join(PAPER_COLUMNS) + " | Avg |"]
    lines.append("|---" * 10 + "|")
    for row_id, scores in PAPER_SCORES.items():
        row = [row_id, *PAPER_SETTINGS[row_id], *(f"{s:.2f}" for s in scores)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Averages only:", "", "| Experiment | Setting | Avg |", "|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in PAPER_AVG_ONLY]
    head = "X-Token (arXiv:2605.21699): Llama-3.2-1B student, 3-shot, accuracy in percent."
    return f"{head}\n\n" + "\n".join(lines)


def write_atomic(path: Path, data: str | bytes) -> None:
    """cli.atomic_write (temp file, then rename): an interrupted run never leaves half a file,
    and the file gets the user's umask. An OS error (disk full, read-only, a directory in the way)
    ends the run in one line, exit 2: atomic_write reports those as a ValueError naming the path,
    said here in evaluate.py's words (what to do, and that finished tasks resume)."""
    payload = data.encode() if isinstance(data, str) else data
    try:
        atomic_write(str(path), lambda f: f.write(payload))
    except ValueError as e:
        if isinstance(e.__cause__, OSError):
            raise write_error(path, e.__cause__, resume=True) from None
        raise UsageError(f"{e} (finished tasks are cached: rerunning resumes)") from None


# -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    models = parse_pairs(args.model, "--model")
    if not models:
        raise UsageError("give at least one --model LABEL=PATH (or --paper for the paper's table)")
    for label, path in models.items():
        check_model(label, path)
    paper_rows = parse_pairs(args.paper_row, "--paper-row")
    for label, row_id in paper_rows.items():
        if label not in models or row_id not in PAPER_SCORES:
            rows = ", ".join(PAPER_SCORES)
            raise UsageError(
                f"--paper-row {label}={row_id}: need a --model label and a row: {rows}"
            )
    out_dir = Path(args.out_dir)
    check_out_dir(out_dir)
    check_device(args.device, args.backend)
    check_devices(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    check_backend(args.backend, tasks)
    check_tasks(tasks, args.include_path)
    check_outputs(out_dir, models, tasks, args)
    for label, path in models.items():  # may ask the hub: last
        check_hub_model(label, path)
    prepare_out_dir(out_dir)  # the first write, once every input is known good

    start, raws, run_id = time.time(), {}, uuid.uuid4().hex
    if args.devices:
        raws = collect(models, tasks, args, run_id, run_workers(models, tasks, args, run_id))
    else:
        with tqdm(total=len(models) * len(tasks), desc="models x tasks", unit="task") as pbar:
            for label, model in models.items():
                raws[label] = evaluate_model(label, model, tasks, args, pbar, run_id)

    columns = [column_of(t) for t in tasks]
    table, metric_of, failures = {}, {}, []
    for label in models:
        table[label] = {}
        for task in tasks:
            value, info = score(task, raws[label][task])
            table[label][column_of(task)] = value
            if value == "failed":
                failures.append(f"- {label} / {task}: failed: {info}")
            else:
                metric_of[task] = info
        if label in paper_rows:  # the paper's row right under ours
            paper = dict(zip(PAPER_COLUMNS, PAPER_SCORES[paper_rows[label]][:5], strict=True))
            table[f"paper: {paper_rows[label]}"] = {c: paper.get(c, "-") for c in columns}

    limit = f", limit={args.limit}" if args.limit else ""
    subsample = " (a subsample: not comparable to the paper)" if limit else ""
    version = importlib.metadata.version("lm_eval")
    notes = [
        f"{args.num_fewshot}-shot{limit}{subsample}; lm-eval {version}, {args.backend} backend, "
        f"dtype {args.dtype}{settings_note(args)}. Accuracy in percent; Avg is the plain mean "
        "of the numbers in the row, (n/m) when only n of its m cells are numbers.",
        "",
        *[f"- {column_of(t)}: lm-eval task `{t}`, metric `{m}`" for t, m in metric_of.items()],
        *[f"- {label}: `{path}`{dtype_of(raws[label])}" for label, path in models.items()],
        *[f"- paper: {r}: {' / '.join(PAPER_SETTINGS[r])}" for r in paper_rows.values()],
        *(["", *failures] if failures else []),
    ]
    markdown = render_markdown(table, columns, notes)
    write_atomic(out_dir / "results.md", markdown)
    write_atomic(out_dir / "results.csv", render_csv(table, columns, models))
    chart = render_chart(table, columns, f"{args.num_fewshot}-shot accuracy{limit}")
    if chart is None:
        print("matplotlib is not installed: no chart (pip install matplotlib)", file=sys.stderr)
    else:
        write_atomic(out_dir / "results.png", chart)
    print(markdown)
    written = "results.md, results.csv" + (", results.png" if chart else "") + ", raw/"
    print(f"wrote {written} to {out_dir}/ in {time.time() - start:.0f}s")
    if failures:  # the last line a script or a person sees, beside exit status 1
        cells = len(models) * len(tasks)
        first = failures[0].removeprefix("- ")
        print(
            f"evaluate.py: error: {len(failures)} of {cells} results failed ({first}); the table "
            "marks them failed; a rerun retries them",
            file=sys.stderr,
        )
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="checkpoint dir (save_pretrained + tokenizer) or hub id; repeatable",
    )
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated lm-eval task names")
    p.add_argument("--num-fewshot", type=fewshot_count, default=3, help="an integer >= 0")
    p.add_argument(
        "--limit",
        type=limit_value,
        default=None,
        help="examples per task (a fraction if < 1): quick checks only",
    )
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="extra directory of lm-eval task YAMLs; repeatable",
    )
    p.add_argument("--out-dir", default="out")
    p.add_argument(
        "--paper-row",
        action="append",
        default=[],
        metavar="LABEL=ROW",
        help=f"show the paper's ROW beside model LABEL; rows: {', '.join(PAPER_SCORES)}",
    )
    p.add_argument("--paper", action="store_true", help="print the paper's table and exit")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: what the checkpoint's config.json names (dtype, or torch_dtype in older "
        "ones); vllm's auto runs fp32 checkpoints in fp16",
    )
    p.add_argument(
        "--model-args",
        type=model_args_value,
        default={},
        metavar="KEY=VALUE,...",
        help="more arguments for lm-eval's model, e.g. attn_implementation=sdpa,max_length=2048",
    )
    p.add_argument(
        "--gen-kwargs",
        type=key_values,
        default={},
        metavar="KEY=VALUE,...",
        help="generation settings for generative tasks (lm-eval's gen_kwargs), e.g. "
        "max_gen_toks=512",
    )
    p.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="prompt through the tokenizer's chat template, few-shot examples as turns "
        "(instruct models)",
    )
    p.add_argument(
        "--batch-size",
        type=batch_size_value,
        help="an integer >= 1, auto or auto:N; default: auto on GPU, 8 on CPU",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or mps (hf backend); default: cuda if available",
    )
    p.add_argument(
        "--devices",
        type=devices_value,
        default=None,
        metavar="N|DEV,DEV,...",
        help="one worker process per device, each evaluating its share of the models: N for "
        "cuda:0 to cuda:N-1, or a list like cuda:0,cuda:2 or cpu,cpu (a device may repeat)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == [WORKER]:
            return work(argv[1] if len(argv) == 2 else "")
        args = parse_args(argv)
        if args.paper:
            if args.model or args.paper_row:
                raise UsageError("--paper prints the paper's table alone; drop --model/--paper-row")
            print(paper_markdown())
            return 0
        return run(args)
    except UsageError as e:
        message = " ".join(str(e).split("\n"))  # one line, even for a path with a newline in it
        print(f"evaluate.py: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
