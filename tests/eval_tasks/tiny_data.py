"""Loads the tiny JSONL data sets next to this file, so the tasks work from any working directory.

lm-eval resolves `dataset_kwargs.data_files` against the current directory; `custom_dataset` is
resolved next to the YAML, so routing through it makes `--include-path tests/eval_tasks` portable.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def load_jsonl(jsonl: str, **_metadata) -> datasets.DatasetDict:
    # Each row carries its split ("train" rows feed the few-shot examples, "test" rows are scored).
    rows = datasets.load_dataset("json", data_files=str(HERE / jsonl), split="train")
    return datasets.DatasetDict(
        {s: rows.filter(lambda r, s=s: r["split"] == s) for s in ("train", "test")}
    )
