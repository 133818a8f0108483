"""Text data for train.py: documents -> windows of `seq_len` student tokens, each aligned with every
teacher (tokens.py, METHOD.md section 4), tokenized inside DataLoader workers.

- `--data`: local .txt (one file = one document), .jsonl (one JSON object per line) or .parquet
  files, a directory of them or a glob; anything else is a hub dataset name, streamed.
- A window is the student's own special tokens (Llama: BOS) + up to seq_len - those text tokens of
  one document, cut where the student has an exact token boundary on a character boundary; the
  teacher tokenizes exactly the text the window covers, with its own special tokens, truncated to
  `teacher_cap` tokens (the truncated tail is a gap: its chunks are -1 on both sides).
- Sharding: local document i belongs to rank i % world_size and, within the rank, to DataLoader
  worker (i // world_size) % num_workers; a hub stream is split the same way by `datasets`
  (split_dataset_by_node over world_size * num_workers shards: by file, or by example).
- Resume: every window carries its position; `advance_state` folds consumed batches into a small
  state that train.py saves and passes back as `start=` (see `advance_state`).
- Bad data is skipped (or repaired: invalid UTF-8 becomes U+FFFD) and counted by reason: a warning
  the first time, then `issue_counts(state)` for the trainer's logs. No usable document: ValueError.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from collections import Counter

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import IterableDataset, get_worker_info

from tokens import TokenSpans, char_byte_offsets, chunk_ids, predictor_chunks, token_spans

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked processes
log = logging.getLogger("data")
EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
# why a document, file or window was skipped, split or cut (counted, see issue_counts)
REASONS = tuple(
    "empty_file unreadable_file bad_json missing_text_field empty_document invalid_utf8 "
    "split_document too_short teacher_truncated unsplittable_text empty_shard".split()
)
_warned: set[str] = set()


def _count(issues: Counter, reason: str, detail: str, n: int = 1) -> None:
    issues[reason] += n
    if reason not in _warned:  # once per process: the counts tell the rest
        _warned.add(reason)
        log.warning("data: %s (%s); further cases are counted, not shown", reason, detail)


def resolve_files(data: str | list[str]) -> list[str] | None:
    """The sorted local files that data names, or None when it is a hub dataset name."""
    if isinstance(data, list | tuple):  # several local paths
        files = [resolve_files(d) for d in data]
        if None in files:
            raise ValueError(f"--data {data}: a list must name local files only")
        return sorted(f for found in files for f in found)
    if any(c in data for c in "*?["):
        files = glob.glob(data, recursive=True)
    elif os.path.isdir(data):
        files = [os.path.join(d, f) for d, _, names in os.walk(data) for f in names]
    elif os.path.isfile(data):
        if not data.endswith(EXTENSIONS):
            raise ValueError(f"{data}: not a {'/'.join(EXTENSIONS)} file")
        files = [data]
    elif data.startswith((".", "/", "~")) or data.endswith(EXTENSIONS):
        raise ValueError(f"{data}: no such file or directory")
    else:
        return None
    files = sorted(f for f in files if f.endswith(EXTENSIONS))
    if not files:
        raise ValueError(f"{data}: holds no {'/'.join(EXTENSIONS)} files")
    return files


def _text(value, issues: Counter, where: str) -> str | None:
    """A document's text, or None (counted) when it has none."""
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            _count(issues, "invalid_utf8", where)
            value = value.decode(errors="replace")
    if not isinstance(value, str):
        _count(issues, "missing_text_field", where)
        return None
    try:
        value.encode()
    except UnicodeEncodeError:  # lone surrogates, from JSON escapes such as "\ud800"
        _count(issues, "invalid_utf8", where)
        value = value.encode(errors="surrogatepass").decode(errors="replace")
    if not value.strip():
        _count(issues, "empty_document", where)
        return None
    return value


def _records(path: str, text_field: str):
    """(where, parse) for each document of one file; parse(issues) gives its text or None, and is
    called only for this worker's documents."""
    if path.endswith(".txt"):  # one file, one document
        if os.path.getsize(path):
            yield path, lambda issues: _text(open(path, "rb").read(), issues, path)
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise LookupError(f"{path} has no column {text_field!r}")
        for batch in parquet.iter_batches(columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield path, lambda issues, value=value: _text(value, issues, path)
    else:
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():  # a blank line is not a document
                    where = f"{path}:{line_no}"
                    yield (
                        where,
                        lambda issues, line=line, where=where: _json_text(
                            line, text_field, issues, where
                        ),
                    )


def _local_documents(files, text_field, wanted, issues):
    """(index, text or None) for every document that wanted(index) selects; the index counts all
    documents of all files in order, so every rank and worker numbers them the same way."""
    index = -1
    for path in files:
        first, owner = index, wanted(index + 1)  # file-level problems: counted by one worker
        try:
            for _, parse in _records(path, text_field):
                index += 1
                if wanted(index):
                    yield index, parse(issues)
        except LookupError as e:
            if owner:
                _count(issues, "missing_text_field", str(e))
        except Exception as e:  # an unreadable file must not stop a long run
            if owner:
                _count(issues, "unreadable_file", f"{path}: {type(e).__name__}: {str(e)[:80]}")
        else:
            if index == first and owner:
                _count(issues, "empty_file", path)


def _json_text(line: bytes, text_field: str, issues: Counter, where: str) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:  # invalid JSON, or bytes that are not UTF-8 at all
        try:
            record = json.loads(line.decode(errors="replace"))
            _count(issues, "invalid_utf8", where)
        except ValueError:
            _count(issues, "bad_json", where)
            return None
    value = record.get(text_field) if isinstance(record, dict) else None
    return _text(value, issues, f"{where} (field {text_field!r})")


def _hub_documents(name, text_field, shard, n_shards, wanted, issues, config=None, split="train"):
    import datasets
    from datasets.distributed import split_dataset_by_node

    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    stream = split_dataset_by_node(stream, rank=shard, world_size=n_shards)
    # .iter(): plain iteration inside a DataLoader worker would split again, by the worker's own id
    for index, row in enumerate(stream.iter(batch_size=1)):
        if wanted(index):
            yield index, _text(row.get(text_field, [None])[0], issues, f"{name} row {index}")


def _parts(text: str, size: int = 1 << 20):
    """A huge document in parts of at most `size` characters, cut after a line break where there is
    one: tokenizing a part at a time bounds the memory a worker needs."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text) and text.rfind("\n", start, end) > start:
            end = text.rfind("\n", start, end) + 1
        yield text[start:end]
        start = end


class AlignedWindows(IterableDataset):
    """Windows of `seq_len` student tokens aligned with each teacher; see the module docstring.

    Item (numpy arrays): student_ids [T], labels [T] (labels[p] = student_ids[p + 1], -100 at the
    end and for special targets), and per teacher i: student_chunk_i [T], teacher_ids_i [Ti],
    teacher_chunk_i [Ti] (chunk ids after the predictor shift, -1 = none); student_chunk is
    student_chunk_0; position [7] = (rank, world_size, worker, num_workers, epoch, document,
    window); issues [len(REASONS)] = this worker's counts so far.
    `repeat=True` streams forever (epoch after epoch), as a trainer with --max-steps wants.
    """

    def __init__(
        self,
        data,
        student_tok,
        teacher_toks,
        seq_len,
        *,
        text_field="text",
        rank=0,
        world_size=1,
        start=None,
        teacher_cap=None,
        repeat=False,
        data_config=None,
        split="train",
    ):
        self.data, self.files = data, resolve_files(data)
        self.student_tok, self.teacher_toks = student_tok, list(teacher_toks)
        self.seq_len, self.text_field, self.start, self.repeat = seq_len, text_field, start, repeat
        self.rank, self.world_size = rank, world_size
        self.teacher_cap = teacher_cap or 2 * seq_len
        self.hub_args = (data_config, split)
        for tok in self.teacher_toks:  # build the byte tables once, before workers fork
            token_spans(tok, "")
        n_special = len(token_spans(student_tok, "").ids)  # the student's own special tokens
        if seq_len <= n_special:
            raise ValueError(f"--seq-len {seq_len} leaves no room after {n_special} special tokens")
        pad = [
            t.pad_token_id if t.pad_token_id is not None else t.eos_token_id or 0
            for t in [student_tok, *self.teacher_toks]
        ]
        self.pad_ids = {"student_ids": pad[0]} | {
            f"teacher_ids_{i}": p for i, p in enumerate(pad[1:])
        }
        issues = Counter()
        if not any(text for _, text in self._documents(lambda i: True, issues)):
            raise ValueError(
                f"--data {data}: no usable document ({dict(issues)}); check --text-field"
            )

    def _documents(self, wanted, issues, shard=0, n_shards=1):
        """(index, text or None) of this shard's documents (local files: `wanted` picks them)."""
        if self.files is not None:
            return _local_documents(self.files, self.text_field, wanted, issues)
        hub = (self.data, self.text_field, shard, n_shards, wanted, issues, *self.hub_args)
        return _hub_documents(*hub)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        state = self.start or {}
        saved = (state["rank"], state["world_size"], state["num_workers"]) if state else None
        if saved not in (None, (self.rank, self.world_size, workers)):
            raise ValueError(
                "resume with the saved run's ranks and DataLoader workers: saved "
                f"{state['world_size']} x {state['num_workers']}, now "
                f"{self.world_size} x {workers}"
            )
        # The DataLoader starts its round robin at worker 0 again: rotate, so that the worker whose
        # turn was next in the saved run goes first.
        worker = (worker + state.get("next_worker", 0)) % workers
        last = state["positions"][worker] if state else None  # last consumed [epoch, doc, window]
        issues = Counter(dict(zip(REASONS, state["issues"][worker]))) if state else Counter()
        epoch = last[0] if last else 0
        # local document i is this worker's when i % (world_size * workers) == shard
        shard, n_shards = self.rank + self.world_size * worker, self.world_size * workers
        while True:
            resumed, produced = last is not None and last[0] == epoch, False

            def wanted(i, resumed=resumed):
                mine = self.files is None or i % n_shards == shard  # a hub stream is split already
                return mine and not (resumed and i < last[1])

            for doc, text in self._documents(wanted, issues, shard, n_shards):
                if text is None:
                    continue
                skip = last[2] if resumed and doc == last[1] else -1
                for window, item in self._windows(text, issues, skip):
                    produced = True
                    item["position"] = np.array(
                        [self.rank, self.world_size, worker, workers, epoch, doc, window]
                    )
                    item["issues"] = np.array([issues[r] for r in REASONS])
                    yield item
            if not self.repeat:
                return
            if not produced and not resumed:  # nothing in this shard: stop rather than spin
                _count(issues, "empty_shard", f"rank {self.rank} worker {worker} got no windows")
                return
            epoch += 1

    def _windows(self, text: str, issues: Counter, skip: int):
        """(window index, item) for the windows of one document after window `skip`."""
        window = -1
        for part in _parts(text):
            for student, window_text in self._student_windows(part, issues):
                window += 1
                if window <= skip:  # aligning is the costly part: only for the windows we keep
                    continue
                if window == 1:  # counted here, so that a resumed run counts it exactly once
                    _count(issues, "split_document", f"{len(text)} characters, several windows")
                item = self._item(student, window_text, issues)
                if item is not None:
                    yield window, item

    def _student_windows(self, text: str, issues: Counter):
        """(the student's TokenSpans of a window, the window's text) for one document (part)."""
        spans = token_spans(self.student_tok, text)
        body = np.flatnonzero(spans.start >= 0)  # all but the special tokens around the text
        if len(body) == 0:
            return
        lo, hi = body[0], body[-1] + 1
        prefix, suffix = spans.ids[:lo], spans.ids[hi:]
        starts = spans.start[lo:hi]
        char_bytes = char_byte_offsets(text)
        on_char = np.zeros(spans.n_bytes + 1, dtype=bool)
        on_char[char_bytes] = True
        # a window may start before token k when k starts at an exact boundary of the student's
        # that is also a character boundary (the window's text must be a string)
        cuts = np.append(np.flatnonzero(spans.cut[lo:hi] & on_char[starts]), hi - lo)
        budget, n, i = self.seq_len - len(prefix) - len(suffix), hi - lo, 0

        def around(body_values, fill):  # the special tokens' values around the window's text
            fills = [np.full(len(p), fill, body_values.dtype) for p in (prefix, suffix)]
            return np.concatenate([fills[0], body_values, fills[1]])

        while i < n:  # greedy: as many tokens as fit, back to the last cut
            j = n if i + budget >= n else cuts[np.searchsorted(cuts, i + budget, "right") - 1]
            if j <= i:  # a normalized region longer than a window: drop it
                _count(issues, "unsplittable_text", f"no clean cut in {budget} tokens")
                i = cuts[np.searchsorted(cuts, i + budget)]
                continue
            byte_lo, byte_hi = starts[i], starts[j] if j < n else spans.n_bytes
            char_lo, char_hi = np.searchsorted(char_bytes, [byte_lo, byte_hi])
            bounds = spans.boundaries  # sorted: the window's are a slice
            bounds = bounds[
                np.searchsorted(bounds, byte_lo) : np.searchsorted(bounds, byte_hi, "right")
            ]
            yield (
                TokenSpans(  # the window's tokens, in the window's bytes
                    ids=prefix + spans.ids[lo + i : lo + j] + suffix,
                    text=around(spans.text[lo + i : lo + j], False),
                    start=around(starts[i:j] - byte_lo, -1),
                    cut=np.zeros(0, dtype=bool),  # not needed from here on
                    boundaries=np.union1d(bounds - byte_lo, [0, byte_hi - byte_lo]),
                    n_bytes=int(byte_hi - byte_lo),
                ),
                text[char_lo:char_hi],
            )
            i = j

    def _item(self, student: TokenSpans, window_text: str, issues: Counter) -> dict | None:
        ids = np.asarray(student.ids, dtype=np.int64)
        if len(ids) < 2:
            _count(issues, "too_short", "a window of one token predicts nothing")
            return None
        labels = np.full(len(ids), -100, dtype=np.int64)
        labels[:-1] = np.where(student.text[1:], ids[1:], -100)
        item = {"student_ids": ids, "labels": labels}
        for i, teacher_tok in enumerate(self.teacher_toks):
            teacher = token_spans(teacher_tok, window_text)
            s_chunk, t_chunk = chunk_ids(student, teacher)
            if len(t_chunk) > self.teacher_cap:  # the chunks that lose teacher tokens become a gap
                _count(issues, "teacher_truncated", f"{len(t_chunk)} > {self.teacher_cap} tokens")
                dropped = t_chunk[self.teacher_cap :]
                t_chunk = t_chunk[: self.teacher_cap]
                if (dropped >= 0).any():  # chunk ids follow the text: all from the first lost one
                    first_lost = dropped[dropped >= 0].min()
                    s_chunk = np.where(s_chunk >= first_lost, -1, s_chunk)
                    t_chunk = np.where(t_chunk >= first_lost, -1, t_chunk)
            item[f"student_chunk_{i}"] = predictor_chunks(s_chunk)
            item[f"teacher_ids_{i}"] = np.asarray(teacher.ids[: self.teacher_cap], dtype=np.int64)
            item[f"teacher_chunk_{i}"] = predictor_chunks(t_chunk)
        if self.teacher_toks:
            item["student_chunk"] = item["student_chunk_0"]
        return item


def collate(batch: list[dict], pad_ids: dict[str, int]) -> dict[str, torch.Tensor]:
    """Pad each key to its longest row: ids with pad_ids[key] (+ a 0/1 mask: student_mask,
    teacher_mask_i), labels with -100, chunks with -1; position and issues are stacked."""
    out = {}
    for key in batch[0]:
        rows = [torch.as_tensor(item[key]) for item in batch]
        if key in ("position", "issues"):
            out[key] = torch.stack(rows)
            continue
        is_ids = key in pad_ids  # student_ids, teacher_ids_i
        fill = pad_ids[key] if is_ids else -100 if key == "labels" else -1
        out[key] = pad_sequence(rows, batch_first=True, padding_value=fill)
        if is_ids:
            ones = [torch.ones(len(r), dtype=torch.long) for r in rows]
            out[key.replace("_ids", "_mask")] = pad_sequence(ones, batch_first=True)
    return out


def advance_state(state: dict | None, batch: dict) -> dict:
    """The resume state once the trainer has consumed `batch`: call it for every batch, in order.

    A batch comes from one DataLoader worker; the DataLoader takes batches from its workers in
    turn, so the state keeps each worker's last window and whose turn is next. Save it (each rank
    its own) and pass it back as AlignedWindows(start=...) with the same ranks and num_workers.
    """
    rank, world_size, worker, workers, epoch, doc, window = batch["position"][-1].tolist()
    state = state or {
        "rank": rank,
        "world_size": world_size,
        "num_workers": workers,
        "positions": [None] * workers,
        "issues": [[0] * len(REASONS) for _ in range(workers)],
    }
    state = {**state, "positions": list(state["positions"]), "issues": list(state["issues"])}
    state["positions"][worker] = [epoch, doc, window]
    state["issues"][worker] = batch["issues"][-1].tolist()
    state["next_worker"] = (worker + 1) % workers
    return state


def issue_counts(state: dict | None) -> Counter:
    """Bad-data counts by reason over all workers of this rank, as of the last consumed batch
    (counts travel with the windows: what a worker skips after its last window is not in them)."""
    total = Counter()
    for counts in (state or {}).get("issues", []):
        total.update({r: c for r, c in zip(REASONS, counts) if c})
    return total


def make_tiny_corpus(path: str, n_docs: int = 300, seed: int = 0) -> str:
    """A deterministic local corpus for tests and the tiny preset: path/part-000.jsonl with prose,
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
