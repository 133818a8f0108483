"""Benchmark: evaluate.py's overhead over calling lm_eval.simple_evaluate directly.

    python bench/bench_evaluate.py                # xtoken_tiny_choice, --limit 8, best of 3
    python bench/bench_evaluate.py --quick        # one repeat: a smoke test in about a minute

The model is a tiny random Llama (2 layers, width 32) with the real Llama-3.2 tokenizer
(pkg:llama-3.2), saved once to a temporary directory as tests/test_evaluate.py does; the task is
one of the local YAML tasks in tests/eval_tasks/. Both paths run as whole fresh subprocesses
(imports, lm-eval's task index and model loading included: what a user waits for), with the same
model, task, --limit, 3-shot, batch size 8, device cpu and dtype auto:

- direct: `lm_eval.simple_evaluate(model="hf", ...)` with a TaskManager on tests/eval_tasks/;
- evaluate.py: `python evaluate.py --model tiny=PATH ...` into a fresh --out-dir (its input checks,
  cache, results.md/.csv/.png and raw JSON included);
- evaluate.py, cached: the same command again on that --out-dir (nothing left to evaluate).

One untimed direct run first fills the datasets cache and the page cache for all. Then the paths
alternate, so they share the machine's noise, and each figure is the best of --repeats. The two
paths must report the same score, or the script stops. Nothing touches the network.
"""

from __future__ import annotations

import os

# Before transformers is imported (here and in the children): it reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tokens import load_tokenizer  # noqa: E402  (from ROOT, just put on the path)

TASK_DIR = os.path.join(ROOT, "tests", "eval_tasks")

# The direct path: what a user of lm-eval writes, with evaluate.py's settings (log_samples=False
# as evaluate.py passes it; simple_evaluate's default, True, would add work to this side only).
# Prints the task's metrics so that the two paths can be checked against each other.
DIRECT = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
model, task, limit, include = sys.argv[1:]
out = lm_eval.simple_evaluate(
    model="hf", model_args={"pretrained": model, "dtype": "auto"}, tasks=[task], num_fewshot=3,
    limit=int(limit), batch_size=8, device="cpu", task_manager=TaskManager(include_path=[include]),
    log_samples=False,
)
print("METRICS", json.dumps(out["results"][task], default=str))
"""


def make_model(path: str) -> None:
    """A tiny random Llama with the real Llama-3.2 tokenizer (tests/test_evaluate.py uses it)."""
    tokenizer = load_tokenizer("pkg:llama-3.2")
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # 128,257 ids: <|image|> included
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def timed(argv: list[str], cwd: str) -> tuple[float, str]:
    """(wall seconds, stdout) of one fresh process; a failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def first_metric(metrics: dict) -> tuple[str, float]:
    # evaluate.score's rule for a local task: the first "metric,filter" key in the YAML's order
    key = next(k for k in metrics if "," in k and "_stderr" not in k)
    return key, 100.0 * metrics[key]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="xtoken_tiny_choice", help="a task in tests/eval_tasks")
    parser.add_argument("--limit", type=int, default=8, help="examples (the tasks have 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--json", metavar="PATH", help="also write the headline figures here")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1

    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "step_10")
        make_model(model)
        direct = [sys.executable, "-c", DIRECT, model, args.task, str(args.limit), TASK_DIR]
        evaluate = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--model", f"tiny={model}"]
        evaluate += ["--include-path", TASK_DIR, "--tasks", args.task, "--limit", str(args.limit)]
        evaluate += ["--num-fewshot", "3", "--batch-size", "8", "--device", "cpu"]

        timed(direct, tmp)  # warm-up, untimed
        times: dict[str, list[float]] = {"direct": [], "evaluate": [], "cached": []}
        for i in range(args.repeats):  # alternate, so that all see the same machine load
            wall, out = timed(direct, tmp)
            times["direct"].append(wall)
            metric, score = first_metric(json.loads(out.split("METRICS", 1)[1]))
            out_dir = ["--out-dir", os.path.join(tmp, f"out{i}")]  # fresh: nothing cached yet
            times["evaluate"].append(timed(evaluate + out_dir, tmp)[0])
            times["cached"].append(timed(evaluate + out_dir, tmp)[0])
            with open(os.path.join(tmp, f"out{i}", "results.csv")) as f:
                ours = float(next(csv.DictReader(f))[args.task])
            if abs(ours - score) > 0.006:  # results.csv holds 2 decimals
                raise SystemExit(f"the paths disagree on {metric}: {ours} vs {score:.4f}")

    best = {path: min(spent) for path, spent in times.items()}
    rows = {
        "direct": "lm_eval.simple_evaluate, direct",
        "evaluate": "evaluate.py",
        "cached": "evaluate.py, cached rerun",
    }
    print(
        f"machine: {os.cpu_count()} CPU cores; task {args.task}, limit {args.limit}, 3-shot, "
        f"batch 8, cpu; whole fresh processes, best of {args.repeats}; {metric} "
        f"{score:.2f} on both paths\n"
    )
    print("| path | seconds | x direct |\n|---|---:|---:|")
    for path, label in rows.items():
        print(f"| {label} | {best[path]:.1f} | {best[path] / best['direct']:.2f} |")

    if args.json:
        overhead = best["evaluate"] - best["direct"]
        figures = [
            {
                "measure": f"direct simple_evaluate ({args.task}, limit {args.limit})",
                "figure": f"{best['direct']:.1f} s",
            },
            {
                "measure": "evaluate.py, same model x task",
                "figure": f"{best['evaluate']:.1f} s ({best['evaluate'] / best['direct']:.2f}x "
                f"direct, {overhead:+.1f} s)",
            },
            {
                "measure": "evaluate.py, cached rerun",
                "figure": f"{best['cached']:.1f} s ({best['cached'] / best['direct']:.2f}x direct)",
            },
        ]
        with open(args.json, "w") as f:
            json.dump({"stage": "evaluate", "figures": figures, "seconds": best}, f, indent=1)


if __name__ == "__main__":
    main()
