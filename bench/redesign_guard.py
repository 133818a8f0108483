"""The redesign guard: fixed tiny runs, W files and audits, recorded before a refactor and compared
after it (a refactor changes no number: losses to 1e-6, W and the audit bit for bit).

    python bench/redesign_guard.py record OUT.json     # on the code before
    python bench/redesign_guard.py compare OUT.json    # on the code after: exit 1 on a difference

Runs on CPU, offline, tiny preset (a few minutes on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PY), "torchrun")
FIELDS = ("loss", "ce", "kd", "kd_scale", "grad_norm", "tokens", "valid_chunks")
TINY = ["--preset", "tiny", "--num-workers", "0", "--max-steps", "6", "--log-every", "1"]
RUNS = {
    "pkl": ["--loss", "pkl"],
    "hkl": ["--loss", "hkl"],
    "gold": ["--loss", "gold"],
    "uld": ["--loss", "uld"],
    "kl": ["--teacher", "pkg:llama-3.2", "--loss", "kl"],
    "ce": ["--loss", "ce"],
    "static-first": ["--loss", "pkl", "--kd-scaling", "static", "--chunk-merge", "first"],
    "two-teachers": [
        "--teacher", "pkg:qwen3", "--loss", "pkl", "--teacher", "pkg:o200k", "--loss", "hkl",
        "--teacher-weight", "0.7", "--teacher-weight", "0.3",
    ],
    "learned-w": ["--loss", "pkl", "--learn-projection", "--grad-accum", "2"],
}  # fmt: skip


def run(argv: list[str], out_dir: str, cache: str, procs: int = 0) -> None:
    cmd = [PY, "train.py"] if not procs else [TORCHRUN, f"--nproc_per_node={procs}", "train.py"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    argv = [*TINY, *argv, "--out-dir", out_dir, "--projection-cache", cache]
    done = subprocess.run(cmd + argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")


def metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    keep = lambda r: {k: v for k, v in r.items() if k in FIELDS or k.startswith("kd/")}  # noqa: E731
    return [keep(r) for r in records]


def sha(path: str) -> str:
    """A hash of a torch.save file's contents (the zip itself holds a random serialization id)."""
    import torch

    digest = hashlib.sha256()

    def add(x) -> None:
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                digest.update(str(k).encode())
                add(x[k])
        elif isinstance(x, list | tuple):
            for v in x:
                add(v)
        elif isinstance(x, torch.Tensor):
            x = x.coalesce() if x.layout == torch.sparse_coo else x
            parts = [x.indices(), x.values()] if x.layout == torch.sparse_coo else [x]
            for part in parts:
                digest.update(str((part.dtype, tuple(part.shape))).encode())
                digest.update(part.contiguous().numpy().tobytes())
        else:
            digest.update(repr(x).encode())

    add(torch.load(path, weights_only=True))
    return digest.hexdigest()


def record() -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        for name, argv in RUNS.items():
            run(argv, os.path.join(tmp, name), cache)
            out[name] = metrics(os.path.join(tmp, name))
            print(name, out[name][-1]["loss"], flush=True)
        # a resumed run: stopped after step 3, resumed to 6 (must equal the uninterrupted pkl run)
        resumed = os.path.join(tmp, "resumed")
        run(["--loss", "pkl", "--stop-step", "3", "--save-every", "3"], resumed, cache)
        run(["--loss", "pkl", "--save-every", "3", "--resume"], resumed, cache)
        out["resumed"] = metrics(resumed)
        fsdp = os.path.join(tmp, "fsdp")
        run(["--loss", "pkl", "--fsdp"], fsdp, cache, procs=2)
        out["fsdp"] = metrics(fsdp)
        ddp = os.path.join(tmp, "ddp")
        run(["--loss", "hkl"], ddp, cache, procs=2)
        out["ddp"] = metrics(ddp)
        print("resumed/fsdp/ddp done", flush=True)
        # build_projection.py and audit.py: W file and audit JSON bit for bit
        w = os.path.join(tmp, "W.pt")
        stage = [PY, "build_projection.py", "--student", "pkg:llama-3.2", "--teacher", "pkg:o200k"]
        topk = os.path.join(tmp, "W_topk.pt")
        subprocess.run(
            [*stage, "--out", w, "--export-topk", topk], cwd=ROOT, check=True, capture_output=True
        )
        out["W_sha256"] = sha(w)
        out["W_topk_sha256"] = sha(topk)
        audit_json = os.path.join(tmp, "audit.json")
        subprocess.run(
            [PY, "audit.py", "--student", "pkg:llama-3.2", "--teacher", "pkg:o200k",
             "--projection", w, "--json", audit_json],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        with open(audit_json) as f:
            out["audit"] = json.load(f)
    return out


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        both_nan = math.isnan(a) and math.isnan(b)
        return [] if both_nan or abs(a - b) <= 1e-6 * max(1.0, abs(a)) else [f"{where}: {a} vs {b}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    now = record()
    if mode == "record":
        with open(path, "w") as f:
            json.dump(now, f, indent=1)
        print(f"recorded {path}")
    else:
        with open(path) as f:
            diffs = differences(json.load(f), now)
        print("\n".join(diffs) or "guard holds: every number equal")
        sys.exit(1 if diffs else 0)
