"""Shared fixtures: the REAL tokenizers shipped inside pip packages, and W built from them.

Nothing here touches the hub: "pkg:NAME" resolves to files inside installed packages
(tokens.PACKAGED).
Loading is cached per test session because o200k is rebuilt from its tiktoken ranks (~5 s).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TOKENIZERS: dict = {}
_PROJECTIONS: dict = {}


def get_tokenizer(name: str):
    """A packaged tokenizer, loaded once per session ("llama-3.2", "qwen3", "o200k", ...)."""
    from tokens import load_tokenizer

    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(f"pkg:{name}")
    return _TOKENIZERS[name]


def get_projection(student: str, teacher: str) -> dict:
    """W built from two packaged tokenizers, once per session."""
    from build_projection import build_projection

    key = (student, teacher)
    if key not in _PROJECTIONS:
        _PROJECTIONS[key] = build_projection(get_tokenizer(student), get_tokenizer(teacher))
    return _PROJECTIONS[key]


@pytest.fixture(scope="session")
def llama():
    return get_tokenizer("llama-3.2")


@pytest.fixture(scope="session")
def qwen():
    return get_tokenizer("qwen3")


@pytest.fixture(scope="session")
def o200k():
    return get_tokenizer("o200k")


@pytest.fixture(scope="session")
def mistral():
    return get_tokenizer("mistral-v1")


@pytest.fixture(scope="session")
def W_llama_qwen() -> dict:
    return get_projection("llama-3.2", "qwen3")


@pytest.fixture(scope="session")
def W_llama_o200k() -> dict:
    return get_projection("llama-3.2", "o200k")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A W cache directory shared by one test module's train.py runs."""
    return str(tmp_path_factory.mktemp("w_cache"))


def read_metrics(out_dir) -> list[dict]:
    """A run's metrics.jsonl records ([] before its first logged step)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def tiny_argv(out_dir, cache: str, *extra: str) -> list[str]:
    """train.py's arguments for an in-process tiny run (no DataLoader workers)."""
    return [
        "--preset",
        "tiny",
        "--out-dir",
        str(out_dir),
        "--projection-cache",
        cache,
        "--num-workers",
        "0",
        *extra,
    ]
