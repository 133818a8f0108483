"""The robustness campaign's cases of bad inputs (issue 27), joined by bench/campaign.py as CASES:
data directories and files the reader must read right or refuse, W files that are no W or hold
invalid entries, full disks under build_projection.py and audit.py, a teacher whose model and
tokenizer disagree, and evaluate.py on checkpoints that are broken or whose config does not match
their weights. Each runs as a user runs it (a subprocess of train.py, build_projection.py,
audit.py or evaluate.py) and is classified by campaign.py.

    python bench/campaign.py --only DATA     # one class of these cases
    python bench/campaign.py --list                # every case, not run

evaluate.py writes its one-line errors as "evaluate.py: error: ..." (bad input: exit 2; results
that failed: exit 1, a failed row in the table and that line last).
"""

from __future__ import annotations

import gzip
import json
import os
import sys

from campaign import PY, ROOT, Case, Ctx, Result

PAIR = ["--student", "pkg:llama-3.2", "--teacher", "pkg:qwen3"]
# the classes of these cases ("input: ...": python bench/campaign.py --only input: runs them all)
DATA, WFILE, DISK = "input: bad data", "input: bad W file", "input: W on a full disk"
VOCAB, EVAL = "input: model vs tokenizer", "input: evaluate checkpoint"
CASES: list[Case] = []


def case(name, kind, run, expect="ok", says=(), check=None, needs=None) -> None:
    CASES.append(Case(name, kind, run, expect, tuple(says), check, needs))


def script(c: Ctx, name: str, *args: str, timeout: float = 240) -> Result:
    return c.command([PY, os.path.join(ROOT, name), *args], timeout=timeout)


def jsonl(path: str, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)


TEXTS = [
    f"Document {i}: {i * 7} cats sat on {i + 3} mats in Zurich, said the note." for i in range(40)
]
ONE_STEP = ("--max-steps", "1", "--save-every", "0")


# ----------------------------------------------------------------------------- bad data


def train_on(prepare, *args: str):
    """train.py (tiny preset, one step) on the --data that prepare(c, data_dir) makes."""

    def run(c: Ctx) -> Result:
        data = os.path.join(c.dir, "data")
        os.makedirs(data)
        target = prepare(c, data) or data
        return c.train("--data", target, *ONE_STEP, *args)

    return run


def recorded_files(c: Ctx) -> list[str]:
    """The data files the run's run_config.json records (what it read)."""
    with open(os.path.join(c.out, "run_config.json")) as f:
        config = json.load(f)
    found = []

    def walk(x):
        if isinstance(x, dict):
            if "data_files" in x and isinstance(x["data_files"], dict):
                found.extend(x["data_files"])
            for v in x.values():
                walk(v)

    walk(config)
    return found


def gz_beside(c: Ctx, d: str) -> None:
    jsonl(os.path.join(d, "a.jsonl"), TEXTS)
    with gzip.open(os.path.join(d, "b.jsonl.gz"), "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS)


def gz_only(c: Ctx, d: str) -> None:
    with gzip.open(os.path.join(d, "b.jsonl.gz"), "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS)


def notebook_copies(c: Ctx, d: str) -> None:
    jsonl(os.path.join(d, "a.jsonl"), TEXTS)
    os.makedirs(os.path.join(d, ".ipynb_checkpoints"))
    jsonl(os.path.join(d, ".ipynb_checkpoints", "a-checkpoint.jsonl"), TEXTS)


def read_only_a_jsonl(c: Ctx, r: Result) -> str | None:
    read = recorded_files(c)
    if any(".ipynb_checkpoints" in f for f in read):
        return f"read the notebook's checkpoint copy: {read}"
    return None if read == ["a.jsonl"] else f"read {read}"


def readme_beside(c: Ctx, d: str) -> None:
    jsonl(os.path.join(d, "a.jsonl"), TEXTS)
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write("# my data\n")
    with open(os.path.join(d, "extra.csv"), "w") as f:
        f.write("text\nmore documents\n")


def json_array(c: Ctx, d: str) -> None:
    with open(os.path.join(d, "a.json"), "w") as f:
        json.dump([{"text": t} for t in TEXTS], f, indent=2)


def json_object(c: Ctx, d: str) -> None:
    with open(os.path.join(d, "a.json"), "w") as f:
        json.dump({"text": " ".join(TEXTS)}, f, indent=2)  # one pretty-printed object


def no_bad_json(c: Ctx, r: Result) -> str | None:
    return "its records were read as bad JSON lines" if "bad_json" in r.out + r.err else None


def gz_named(c: Ctx, d: str) -> str:
    gz_only(c, d)
    return os.path.join(d, "b.jsonl.gz")


def only_readme(c: Ctx, d: str) -> None:
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write("# nothing here\n")


def all_bad_json(c: Ctx, d: str) -> None:
    with open(os.path.join(d, "a.jsonl"), "w") as f:
        f.write("not json\n{'text': 'python, not JSON'}\n")


def plain(c: Ctx, d: str) -> None:
    jsonl(os.path.join(d, "a.jsonl"), TEXTS)


case("a .jsonl.gz beside plain files", DATA, train_on(gz_beside), "error",
     ["compressed data file", "b.jsonl.gz", "decompress"])  # fmt: skip
case("a directory of only .jsonl.gz", DATA, train_on(gz_only), "error",
     ["compressed data file", "b.jsonl.gz"])  # fmt: skip
case("--data names a .jsonl.gz file", DATA, train_on(gz_named), "error",
     ["not a .txt/.jsonl/.json/.parquet file"])  # fmt: skip
case("a notebook's .ipynb_checkpoints copy beside the data", DATA,
     train_on(notebook_copies), says=["1 hidden (.ipynb_checkpoints/)"],
     check=read_only_a_jsonl)  # fmt: skip
case("README.md and a .csv beside the data", DATA, train_on(readme_beside),
     says=["2 of another kind (README.md, extra.csv)"],
     check=read_only_a_jsonl)  # fmt: skip
case("a .json file holding a JSON array", DATA, train_on(json_array), check=no_bad_json)
case("a .json file holding one pretty-printed object", DATA, train_on(json_object),
     "error", ["no usable document"])  # fmt: skip
case("a directory of only a README", DATA, train_on(only_readme), "error",
     ["holds no .txt/.jsonl/.json/.parquet files"])  # fmt: skip
case("a .jsonl file of bad JSON only", DATA, train_on(all_bad_json), "error",
     ["no usable document", "bad_json"])  # fmt: skip
case("--teacher-cap 1", DATA, train_on(plain, "--teacher-cap", "1"), "error",
     ["--teacher-cap 1", "no distillation signal"])  # fmt: skip


# ----------------------------------------------------------------------------- bad W files


def w_file(c: Ctx, make) -> str:
    """A W file in the case's directory: make(projection of the cache's pair) -> what to save, or
    bytes to write."""
    import torch

    from build_projection import build_projection, save_projection
    from tokens import load_tokenizer

    path = os.path.join(c.dir, "W.pt")
    if isinstance(make, bytes):
        with open(path, "wb") as f:
            f.write(make)
        return path
    projection = build_projection(load_tokenizer("pkg:llama-3.2"), load_tokenizer("pkg:qwen3"))
    made = make(projection)
    if made is projection:
        save_projection(made, path)
    else:
        torch.save(made, path)
    return path


def scaled(factor: float):
    def make(projection: dict) -> dict:
        import torch

        W = projection["W"].coalesce()
        values = W.values() * factor
        return {**projection, "W": torch.sparse_coo_tensor(W.indices(), values, W.shape).coalesce()}

    return make


def topk_with_id(teacher_id: int):
    def make(projection: dict) -> dict:
        from topk_interop import to_topk

        indices, likelihoods = to_topk(projection["W"])
        indices[679, 0] = teacher_id  # '201'
        return {"indices": indices, "likelihoods": likelihoods, "student_model_id": "x",
                "teacher_model_id": "y", "enable_scale_trick": False}  # fmt: skip

    return make


def audit_w(make, *extra: str):
    return lambda c: script(c, "audit.py", *PAIR, "--projection", w_file(c, make), *extra)


def train_w(make):
    def run(c: Ctx) -> Result:
        return c.train("--loss", "pkl", "--projection", w_file(c, make), *ONE_STEP)

    return run


def truncated_w(c: Ctx) -> str:
    path = w_file(c, lambda p: p)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


case("audit.py on a 0-byte W", WFILE, audit_w(b""), "error", ["is empty (0 bytes"])
case("audit.py on a text file as W", WFILE, audit_w(b"W = {201: 2}\n"), "error",
     ["is not a readable W file"])  # fmt: skip
case("audit.py on a W cut in half", WFILE,
     lambda c: script(c, "audit.py", *PAIR, "--projection", truncated_w(c)), "error",
     ["is not a readable W file"])  # fmt: skip
case("train.py on a 0-byte W", WFILE, train_w(b""), "error", ["is empty (0 bytes"])
case("train.py on a text file as W", WFILE, train_w(b"hello\n"), "error",
     ["is not a readable W file"])  # fmt: skip
case("audit.py on a W whose rows sum to 0.5", WFILE, audit_w(scaled(0.5)), "error",
     ["do not sum to 1"])  # fmt: skip
case("audit.py on a W whose rows sum to 5", WFILE, audit_w(scaled(5.0)), "error",
     ["do not sum to 1"])  # fmt: skip
case("train.py on a W whose rows sum to 0.5", WFILE, train_w(scaled(0.5)), "error",
     ["do not sum to 1"])  # fmt: skip
case("audit.py on a top-k W with teacher id 999999", WFILE,
     audit_w(topk_with_id(999_999), "--show", "201"), "error",
     ["teacher id 999999", "has 151669 ids"])  # fmt: skip
case("train.py on a top-k W with teacher id 999999", WFILE,
     train_w(topk_with_id(999_999)), "error", ["teacher id 999999"])  # fmt: skip
case("audit.py on a W of another pair", WFILE,
     lambda c: script(c, "audit.py", "--student", "pkg:llama-3.2", "--teacher",
                      "pkg:mistral-v1", "--projection", w_file(c, lambda p: p)),
     "error", ["another teacher tokenizer"])  # fmt: skip
case("audit.py on a valid W (unchanged)", WFILE, audit_w(lambda p: p, "--show", "201"),
     says=["recommended loss: pkl", "'201' (679) -> '2' (17) 0.9009"])  # fmt: skip


# ----------------------------------------------------------------------------- full disks


def build_on_full_disk(flag: str, size: str = "2m"):
    def run(c: Ctx) -> Result:
        disk = c.tmpfs(size)
        with open(os.path.join(disk, "W.pt"), "wb") as f:
            f.write(b"the old W")
        return script(c, "build_projection.py", *PAIR, flag, os.path.join(disk, "W.pt"))

    return run


def old_w_kept(c: Ctx, r: Result) -> str | None:
    disk = c.mounts[0]
    left = sorted(os.listdir(disk))
    if left != ["W.pt"]:
        return f"left behind: {left}"
    with open(os.path.join(disk, "W.pt"), "rb") as f:
        return None if f.read() == b"the old W" else "the old W was changed"


def audit_json_on_full_disk(c: Ctx) -> Result:
    disk = c.tmpfs("4k")
    try:  # fill it
        with open(os.path.join(disk, "fill"), "wb") as f:
            f.write(b"x" * 8192)
    except OSError:
        pass
    return script(c, "audit.py", *PAIR, "--json", os.path.join(disk, "audit.json"))


case("build_projection.py --out onto a full disk", DISK, build_on_full_disk("--out"),
     "error", ["No space left on device", "free on", "W.pt"], old_w_kept, "root")  # fmt: skip
case("build_projection.py --export-topk onto a full disk", DISK,
     build_on_full_disk("--export-topk"), "error", ["No space left on device", "free on"],
     old_w_kept, "root")  # fmt: skip
case("audit.py --json onto a full disk", DISK, audit_json_on_full_disk, "error",
     ["No space left on device", "audit.json"], None, "root")  # fmt: skip


# ----------------------------------------------------------------------------- vocabularies


def short_teacher(c: Ctx) -> str:
    """A tiny Qwen3 teacher whose model has 151,000 output rows, with Qwen3's tokenizer (151,669
    ids): a model and a tokenizer that do not belong together."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flags import SHAPES
    from tokens import load_tokenizer

    path = os.path.join(c.dir, "teacher")
    config = Qwen3Config(**SHAPES["tiny"], vocab_size=151_000, tie_word_embeddings=True,
                         max_position_embeddings=512)  # fmt: skip
    Qwen3ForCausalLM(config).save_pretrained(path)
    load_tokenizer("pkg:qwen3").save_pretrained(path)
    return path


def train_short_teacher(*args: str):
    def run(c: Ctx) -> Result:
        teacher = short_teacher(c)
        cache = os.path.join(c.dir, "cache")  # its own: a W is built for these sizes
        return c.train("--teacher", teacher, "--loss", "pkl", "--projection-cache", cache,
                       *ONE_STEP, *args)  # fmt: skip

    return run


def train_short_teacher_with_w(c: Ctx) -> Result:
    teacher = short_teacher(c)
    return c.train("--teacher", teacher, "--loss", "pkl", "--projection",
                   w_file(c, lambda p: p), *ONE_STEP)  # fmt: skip


case("a teacher with fewer output rows than tokenizer ids", VOCAB,
     train_short_teacher(), "error", ["the model and its tokenizer disagree"])  # fmt: skip
case("the same teacher with a W file", VOCAB, train_short_teacher_with_w,
     "error", ["disagree"])  # fmt: skip
case("build_projection.py --teacher-vocab-size below the tokenizer", VOCAB,
     lambda c: script(c, "build_projection.py", *PAIR, "--teacher-vocab-size", "151000",
                      "--out", os.path.join(c.dir, "W.pt")), "error",
     ["--teacher-vocab-size 151000 is smaller than the teacher tokenizer"])  # fmt: skip


# ----------------------------------------------------------------------------- evaluate.py


def checkpoint(c: Ctx, change=None) -> str:
    """A tiny random Llama checkpoint (bench/bench_evaluate.py's), changed by change(path)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_evaluate import make_model

    path = os.path.join(c.dir, "ckpt")
    make_model(path)
    if change:
        change(path)
    return path


def config_change(**changes):
    def change(path: str) -> None:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config | changes, f)

    return change


def cut_weights(path: str) -> None:
    weights = os.path.join(path, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)


def no_weights(path: str) -> None:
    os.remove(os.path.join(path, "model.safetensors"))


def empty_weights(path: str) -> None:
    from safetensors.torch import save_file

    save_file({}, os.path.join(path, "model.safetensors"))


def evaluate(change=None, *extra: str):
    def run(c: Ctx) -> Result:
        ckpt = checkpoint(c, change)
        tasks = os.path.join(ROOT, "tests", "eval_tasks")
        return script(c, "evaluate.py", "--model", f"m={ckpt}", "--include-path", tasks,
                      "--tasks", "xtoken_tiny_choice", "--limit", "2", "--out-dir",
                      os.path.join(c.dir, "out"), *extra, timeout=300)  # fmt: skip

    return run


def failed_row(*said: str):
    def check(c: Ctx, r: Result) -> str | None:
        if r.code != 1:
            return f"exit status {r.code}, not 1"
        path = os.path.join(c.dir, "out", "results.md")
        text = open(path).read() if os.path.exists(path) else ""
        if "| m | failed |" not in text:
            return "no failed row in results.md"
        missing = [s for s in said if s not in text]
        return f"results.md does not say {missing}" if missing else None

    return check


case("evaluate.py: config names another architecture (qwen2)", EVAL,
     evaluate(config_change(model_type="qwen2", architectures=["Qwen2ForCausalLM"])), "error",
     ["results failed", "does not match its weights"],
     failed_row("does not match its weights", "would be random"))  # fmt: skip
case("evaluate.py: config with another layer size", EVAL,
     evaluate(config_change(intermediate_size=96)), "error",
     ["results failed", "does not match its weights"],
     failed_row("weights have another shape"))  # fmt: skip
case("evaluate.py: weights cut in half", EVAL, evaluate(cut_weights), "error",
     ["model.safetensors is not a readable safetensors file", "save the checkpoint"])  # fmt: skip
case("evaluate.py: a weights file with no tensors", EVAL, evaluate(empty_weights), "error",
     ["model.safetensors holds no tensors"])  # fmt: skip
case("evaluate.py: no weights file", EVAL, evaluate(no_weights), "error",
     ["config.json but no weights"])  # fmt: skip
case("evaluate.py: a valid checkpoint (unchanged)", EVAL, evaluate(),
     check=lambda c, r: None if "| m | " in open(os.path.join(c.dir, "out", "results.md")).read()
     else "no row")  # fmt: skip
