"""Text data for train.py: documents -> shuffled, packed windows of `seq_len` student tokens, each
aligned with every teacher (align.py, METHOD.md section 4), tokenized inside DataLoader workers.

- `--data`: local .txt (one file = one document), .jsonl (one JSON object per line), .json (a
  JSON array of records, else JSON lines) or .parquet files, a directory of them or a glob (or a
  list of these); anything else is a hub dataset name, streamed (`data_config`, `split`).
- Files (`resolve_files`): a directory is read recursively, in sorted order. Hidden files and
  directories (a name that starts with ".": .ipynb_checkpoints/, .git/) are skipped, as a glob
  skips them; so is any other file that is not one of the four kinds (README.md, a .csv); both are
  counted in one warning. A compressed data file (.jsonl.gz, .json.zst, .txt.bz2, ...) is an
  error, never skipped: decompress it, or name only the files to read (a glob such as
  DIR/*.jsonl). A file named directly must be one of the four kinds.
- Order (`shuffle=True`): each epoch, a seeded order of the files (and of a hub dataset's shards),
  `INTERLEAVE` files read at a time in turn, then a seeded buffer of `shuffle_buffer` documents per
  DataLoader worker. It mixes documents across files and within the buffer's reach; it does not
  shuffle a single huge file globally (a buffer draws from what has been read).
- A window (packing, the default): the student's own leading special tokens (Llama: BOS), then
  consecutive documents, each followed by the student's end-of-document token, up to `seq_len`
  tokens; a long document continues in the next window. Each document piece (segment) is cut where
  the student has an exact token boundary on a character boundary. `teacher_window=L` (train.py's
  default): every teacher reads each document alone, in windows of L of its own tokens, whatever
  the student (METHOD.md 4.3): a segment's teacher side is the rows [its prefix, the part's
  teacher tokens from a window's start to the segment's end], and the chunk a student cut runs
  through is dropped. `teacher_window=None` (the old rule): every teacher tokenizes exactly each
  segment's text, with its own leading special tokens and end-of-document token, in the student's
  window. A same-tokenizer teacher gets the student's ids. Chunks never cross a segment;
  separators and special tokens belong to no chunk; a chunk holding a side's first token (no
  predictor position) is dropped on both sides. `pack=False`: one document per window.
- Chat records (`messages`, or `prompt` and `completion`) are conversations, packed as documents
  are; chat.py renders each in every side's own chat template and cuts it (METHOD.md 4.2).
- Sharding: document i of the epoch's stream belongs to rank i % world_size and, within the rank,
  to DataLoader worker (i // world_size) % num_workers.
- Resume: every window carries where its worker's next window starts (epoch, document, character);
  `advance_state` folds consumed batches into a small state that train.py saves and passes back as
  `start=`: the order is replayed without tokenizing, so a resumed run sees the same windows.
- Bad data is skipped (or repaired: invalid UTF-8 becomes U+FFFD) and counted by reason: a warning
  the first time, then `issue_counts(state)` for the trainer's logs. No usable document: ValueError.

Two halves. Where documents come from: `documents` (this worker's share of an epoch, in order, from
a resume position; `resume_point` reads the saved state), the files read by `_records` and every
record turned into text (or a Conversation) by `record_text`. How a window is made:
`AlignedWindows` packs documents into windows (`_pack`), cuts a long document where the student
allows (`_segments`) and aligns a window with each teacher (`_item`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets.distributed import split_dataset_by_node
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import IterableDataset, get_worker_info

from align import TokenSpans, char_byte_offsets, chunk_ids, predictor_chunks, token_spans
from tokens import end_of_document_id, tokenizer_hash

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked processes
log = logging.getLogger("data")
EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
# data files in a compression the reader does not open: an error, never skipped (resolve_files)
COMPRESSED_DATA = tuple(e + c for e in EXTENSIONS for c in (".gz", ".bz2", ".xz", ".zst", ".zip"))
INTERLEAVE = 8  # files read at a time, in turn, when shuffling
STATE_FORMAT = 2  # 2: packed windows; a resume state records where the next window starts
# why a document, file or window was skipped, split or cut (counted, see issue_counts)
REASONS = tuple(
    "empty_file unreadable_file bad_json missing_text_field empty_document invalid_utf8 "
    "split_document too_short teacher_truncated unsplittable_text empty_shard "
    "bad_conversation no_assistant_content chat_template".split()  # the last three: chat.py
)
CHAT_FIELDS = frozenset(("messages", "prompt", "completion"))  # a chat record's (record_text)
_warned: set[str] = set()
Parse = Callable[[Counter], "str | None"]  # a document's text (or None), read only when needed


def _count(issues: Counter, reason: str, detail: str, n: int = 1) -> None:
    issues[reason] += n
    if reason not in _warned:  # once per process: the counts tell the rest
        _warned.add(reason)
        log.warning("data: %s (%s); further cases are counted, not shown", reason, detail)


# ---- where documents come from: files or a hub dataset, their order, this worker's share, resume


@dataclass
class DocumentSource:
    """Where the documents come from (`--data`: local files, resolved once, or a hub dataset) and
    how they are ordered (module docstring, Order); read by `documents`."""

    data: str | list[str]
    files: list[str] | None  # resolve_files(data); None: a hub dataset
    text_field: str = "text"
    data_config: str | None = None
    split: str = "train"
    shuffle: bool = True
    shuffle_buffer: int = 10_000
    seed: int = 0


def resolve_files(data: str | list[str]) -> list[str] | None:
    """The sorted local files that data names, or None when it is a hub dataset name. The rules
    (module docstring, Files): hidden names and other kinds of file are skipped and counted in one
    warning; a compressed data file is a ValueError."""
    if isinstance(data, list | tuple):  # several local paths
        files = [resolve_files(d) for d in data]
        if None in files:
            raise ValueError(f"--data {data}: a list must name local files only")
        return sorted(f for found in files for f in found)
    hidden: list[str] = []  # hidden directories and files, not descended into nor read
    if any(c in data for c in "*?["):
        files = glob.glob(data, recursive=True)  # a glob matches no hidden name
    elif os.path.isdir(data):
        files = []
        for d, dirs, names in os.walk(data):
            hidden += [os.path.join(d, x) + os.sep for x in dirs if x.startswith(".")]
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            hidden += [os.path.join(d, x) for x in names if x.startswith(".")]
            files += [os.path.join(d, x) for x in names if not x.startswith(".")]
    elif os.path.isfile(data):
        if not data.endswith(EXTENSIONS):
            raise ValueError(f"{data}: not a {'/'.join(EXTENSIONS)} file")
        files = [data]
    elif data.startswith((".", "/", "~")) or data.endswith(EXTENSIONS):
        raise ValueError(f"{data}: no such file or directory")
    else:
        return None
    compressed = sorted(f for f in files if f.endswith(COMPRESSED_DATA))
    if compressed:
        raise ValueError(
            f"{data}: holds {len(compressed)} compressed data file(s) this reader does not read "
            f"({_some(compressed, data)}); decompress them, or name only the files to read "
            "(a glob such as DIR/*.jsonl)"
        )
    other = sorted(f for f in files if not f.endswith(EXTENSIONS))
    files = sorted(f for f in files if f.endswith(EXTENSIONS))
    if not files:
        raise ValueError(f"{data}: holds no {'/'.join(EXTENSIONS)} files")
    skipped = [
        f"{len(names)} {what} ({_some(sorted(names), data)})"
        for what, names in (("hidden", hidden), ("of another kind", other))
        if names
    ]
    if skipped and f"files {data}" not in _warned:  # once per process
        _warned.add(f"files {data}")
        log.warning("data: %s: reads %d files; skipped: %s", data, len(files), ", ".join(skipped))
    return files


def _some(paths: list[str], root: str, n: int = 3) -> str:
    """The first n paths, relative to root where they are under it, and how many more."""
    base = root if os.path.isdir(root) else ""
    shown = [os.path.relpath(p, base) + ("/" if p.endswith(os.sep) else "") if base else p
             for p in paths[:n]]  # fmt: skip
    return ", ".join(shown) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def check_teacher_cap(cap: int, teacher_toks) -> None:
    """--teacher-cap must leave every teacher room for one aligned chunk: its own leading special
    tokens, then a text token that is predicted (a side's first token never is). A smaller cap
    cuts every window's teacher side to nothing aligned: a run with no distillation signal."""
    for tok in teacher_toks:
        need = max(len(_own_prefix(tok)) + 1, 2)
        if cap < need:
            name = getattr(tok, "name_or_path", "") or "a teacher"
            raise ValueError(
                f"--teacher-cap {cap} leaves {name} no aligned chunk in any window (a chunk needs "
                f"at least {need} teacher tokens here): the run would have no distillation "
                "signal; give a larger cap, or leave it out (2 x --seq-len)"
            )


def documents(
    source: DocumentSource,
    epoch: int,
    shard: int,
    n_shards: int,
    issues: Counter,
    resume_doc: int = -1,
) -> Iterator[tuple[int, str]]:
    """(index in the shard's stream, text) of shard `shard` of `n_shards`'s usable documents, in
    this epoch's order, from document `resume_doc` on (-1: the start). A bad document is counted in
    `issues` and skipped. Documents before `resume_doc` are replayed, not read (the saved counts
    already hold their problems), and `resume_doc` itself was counted when it was first read."""
    for doc, parse in enumerate(_ordered(source, epoch, shard, n_shards)):
        if doc < resume_doc:
            continue
        text = parse(Counter() if doc == resume_doc else issues)
        if text is not None:
            yield doc, text


def resume_point(start: dict | None, rank: int, world_size: int):
    """(worker, num_workers, (epoch, document, character) where the worker's next window starts,
    its bad-data counts so far) for the DataLoader worker this runs in (0 of 1 outside one), from
    a resume state (advance_state; None: the beginning)."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    state = start or {}
    if state and state.get("format") != STATE_FORMAT:
        raise ValueError(
            "the saved data position comes from an older data pipeline (unpacked windows): "
            "start a new run (another --out-dir), or resume with the version that wrote it"
        )
    saved = (state["rank"], state["world_size"], state["num_workers"]) if state else None
    if saved not in (None, (rank, world_size, workers)):
        raise ValueError(
            "resume with the saved run's ranks and DataLoader workers: saved "
            f"{state['world_size']} x {state['num_workers']}, now {world_size} x {workers}"
        )
    # The DataLoader starts its round robin at worker 0 again: rotate, so that the worker whose
    # turn was next in the saved run goes first.
    worker = (worker + state.get("next_worker", 0)) % workers
    if not state:
        return worker, workers, (0, -1, 0), Counter()
    epoch, doc, char = state["positions"][worker] or (0, -1, 0)
    return worker, workers, (epoch, doc, char), Counter(dict(zip(REASONS, state["issues"][worker])))


def _ordered(source: DocumentSource, epoch: int, shard: int, n_shards: int) -> Iterator[Parse]:
    """This shard's documents (unparsed) in this epoch's order (see the module docstring)."""
    if source.files is None:
        stream = _hub_documents(source, epoch, shard, n_shards)
    else:
        files = list(source.files)
        if source.shuffle:
            random.Random(f"files {source.seed} {epoch}").shuffle(files)
        everything = _interleaved(files, source.text_field, INTERLEAVE if source.shuffle else 1)
        stream = (parse for i, parse in enumerate(everything) if i % n_shards == shard)
    if source.shuffle and source.shuffle_buffer > 1:
        rng = random.Random(f"documents {source.seed} {epoch} {shard} {n_shards}")
        stream = _shuffled(stream, source.shuffle_buffer, rng)
    return stream


def _interleaved(files: list[str], text_field: str, width: int) -> Iterator[Parse]:
    """Every document of `files`, `width` files open at a time, one document from each in turn
    (a finished file's place goes to the next one): the same order on every rank and worker."""
    queue = list(files)[::-1]
    readers: list[Iterator[Parse]] = []
    while queue or readers:
        while queue and len(readers) < width:
            readers.append(_file_documents(queue.pop(), text_field))
        for reader in list(readers):
            parse = next(reader, None)
            if parse is None:
                readers.remove(reader)
            else:
                yield parse


def _file_documents(path: str, text_field: str) -> Iterator[Parse]:
    """One file's documents; a file that cannot be read is counted and skipped: an unreadable
    file must not stop a long run."""
    produced = False
    try:
        for parse in _records(path, text_field):
            produced = True
            yield parse
    except LookupError as e:
        yield _problem("missing_text_field", str(e))
    except (OSError, ValueError, pa.ArrowException) as e:  # I/O; a damaged or odd parquet file
        yield _problem("unreadable_file", f"{path}: {type(e).__name__}: {str(e)[:80]}")
    else:
        if not produced:
            yield _problem("empty_file", path)


def _problem(reason: str, detail: str) -> Parse:
    """A file-level problem as a document of its own: counted when its shard reads it, exactly once
    (a resumed run replays the order without reading what it skips)."""

    def parse(issues: Counter) -> None:
        _count(issues, reason, detail)

    return parse


def _records(path: str, text_field: str) -> Iterator[Parse]:
    """Each document of one local file, unparsed (parsed only for this worker's documents): a .txt
    file is one document; each line of a .jsonl (.json) file and each row of a .parquet file is a
    record (record_text)."""
    if path.endswith(".txt"):
        return _txt_document(path)
    if path.endswith(".parquet"):
        return _parquet_records(path, text_field)
    if path.endswith(".json") and _starts_with(path, b"["):
        return _json_array_records(path, text_field)
    return _jsonl_records(path, text_field)


def _txt_document(path: str) -> Iterator[Parse]:
    if os.path.getsize(path):  # an empty file has no document
        yield partial(_read_txt, path)


def _parquet_records(path: str, text_field: str) -> Iterator[Parse]:
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    columns = [c for c in (text_field, *sorted(CHAT_FIELDS)) if c in names]
    if not columns:
        raise LookupError(f"{path} has no column {text_field!r} (nor messages, prompt/completion)")
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):  # bounded
        for record in batch.to_pylist():
            yield partial(record_text, record, text_field, where=path)


def _jsonl_records(path: str, text_field: str) -> Iterator[Parse]:
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():  # a blank line is not a document
                yield partial(_json_text, line, text_field, where=f"{path}:{line_no}")


def _starts_with(path: str, char: bytes) -> bool:
    """Whether the file's first character other than white space (and a UTF-8 BOM) is `char`."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1] == char


def _json_array_records(path: str, text_field: str) -> Iterator[Parse]:
    """A .json file that holds a JSON array: each element is a record. The array is parsed whole
    (in every worker that reads the file); invalid JSON makes the file unreadable (counted)."""
    with open(path, "rb") as f:
        records = json.loads(f.read())
    for index, record in enumerate(records):
        yield partial(record_text, record, text_field, where=f"{path}[{index}]")


def _hub_documents(source: DocumentSource, epoch: int, shard: int, n_shards: int):
    """A hub dataset's documents for one shard: `datasets` streams it and splits it by shard (by
    file, or by example); with shuffle, its files come in a seeded order, reseeded per epoch."""
    name = source.data
    try:
        stream = datasets.load_dataset(name, source.data_config, split=source.split, streaming=True)
    except (OSError, datasets.exceptions.DatasetNotFoundError) as e:  # offline, or no such name
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(
            f"--data {name}: cannot load this hub dataset ({why}); check the name "
            "and the network, or pass local files"
        ) from None
    if source.shuffle:  # the order of the dataset's files; documents are mixed by our own buffer
        stream = stream.shuffle(seed=source.seed, buffer_size=1)
        stream.set_epoch(epoch)
    stream = split_dataset_by_node(stream, rank=shard, world_size=n_shards)
    # .iter(): plain iteration inside a DataLoader worker would split again, by the worker's own id
    for index, row in enumerate(stream.iter(batch_size=1)):
        record = {key: values[0] for key, values in row.items()}
        yield partial(record_text, record, source.text_field, where=f"{name} row {index}")


def record_text(record, text_field: str, issues: Counter, where: str) -> str | Conversation | None:
    """A record's document (a JSON line's object, a parquet or hub dataset row), or None (counted)
    when it has none: its text, or a Conversation when it is a chat record (a list of messages in
    the text field or `messages`, or TRL's `prompt` and `completion`), which chat.py reads."""
    if not isinstance(record, dict):
        return _text(None, issues, where)
    value = record.get(text_field)
    if isinstance(value, list) or value is None and not CHAT_FIELDS.isdisjoint(record):
        return Conversation(record, text_field, where)
    return _text(value, issues, where)


@dataclass(frozen=True)
class Conversation:
    """A chat record as read; chat.py checks its messages and renders them on every side."""

    record: dict
    text_field: str
    where: str


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
    return record_text(record, text_field, issues, f"{where} (field {text_field!r})")


def _read_txt(path: str, issues: Counter) -> str | None:
    try:
        with open(path, "rb") as f:
            return _text(f.read(), issues, path)
    except OSError as e:  # removed or unreadable since the listing: counted, never fatal
        _count(issues, "unreadable_file", f"{path}: {e.strerror}")
        return None


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


def _shuffled(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """A bounded shuffle: hold `size` items; each new item takes the place of a random one, which
    is emitted. Memory: `size` documents (unparsed)."""
    buffer: list = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer


# ---- how a window is made: tokenizing, packing, cutting, aligning with every teacher


def _parts(text: str, size: int = 1 << 20) -> Iterator[tuple[int, str]]:
    """(character offset, part) of a document in parts of at most `size` characters, cut after a
    line break where there is one: tokenizing a part at a time bounds the memory a worker needs."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text) and text.rfind("\n", start, end) > start:
            end = text.rfind("\n", start, end) + 1
        yield start, text[start:end]
        start = end


def _body(spans: TokenSpans) -> TokenSpans:
    """The text tokens of a view, without the special tokens the tokenizer adds around a text."""
    body = np.flatnonzero(spans.start >= 0)
    lo, hi = (body[0], body[-1] + 1) if len(body) else (0, 0)
    return TokenSpans(
        spans.ids[lo:hi],
        spans.text[lo:hi],
        spans.start[lo:hi],
        spans.cut[lo:hi],
        spans.boundaries,
        spans.n_bytes,
    )


def _own_prefix(tok) -> list[int]:
    """The special tokens a tokenizer puts before any text (Llama: BOS; Qwen3, o200k: none)."""
    spans = token_spans(tok, "a")
    return spans.ids[: int(np.argmax(spans.start >= 0))]


@dataclass(frozen=True)
class _Segment:
    """A piece of one document inside a window: the student's tokens of it (in the segment's own
    bytes), its text, and whether the document ends with it (then an end-of-document token
    follows)."""

    student: TokenSpans
    text: str
    ends_document: bool
    # a conversation's piece (chat.py): which student tokens are CE targets (None: a document's
    # text tokens, and its end-of-document token follows), and every side's template tokens
    target: np.ndarray | None = field(default=None, compare=False)
    template: object = None  # (chat.Template; the segment has no text then)
    # a document's piece: the part it was cut from and its first student token there (the
    # teacher reads the part in its own windows, whatever the student's cut: METHOD.md 4.3)
    part: _Part | None = field(default=None, compare=False, repr=False)
    lo: int = 0


# the end of a document whose tail was dropped (no clean cut): no tokens, but the separator follows
_BARE_END = _Segment(
    TokenSpans(
        [], np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(1, np.int64), 0
    ),
    "",
    True,
)


@dataclass
class _Part:
    """A document part as the student tokenizes it, and where a segment of it may be cut."""

    text: str
    spans: TokenSpans  # its text tokens
    document: str | None = None  # a document's part: the document, and where the part starts
    offset: int = 0
    char_bytes: np.ndarray = field(init=False)  # the byte offset of every character offset
    cuts: np.ndarray = field(init=False)  # the tokens a segment may start at, sorted
    views: dict = field(init=False, default_factory=dict)  # per teacher: _teacher_view

    def __post_init__(self):
        self.char_bytes = char_byte_offsets(self.text)
        on_char = np.zeros(self.spans.n_bytes + 1, dtype=bool)
        on_char[self.char_bytes] = True
        starts = self.spans.start
        # a segment may start before token k when k starts at an exact boundary of the student's
        # that is also a character boundary (the segment's text must be a string)
        cuts = np.flatnonzero(self.spans.cut & on_char[starts])
        # ...and never right after a token of no source bytes (a SentencePiece model's prefix
        # space): that token would be a piece of its own, and a resume would repeat it
        self.cuts = cuts[(cuts == 0) | (starts[cuts] > starts[np.maximum(cuts - 1, 0)])]

    def token_at(self, char: int) -> int:
        """The first token that starts at or after character `char`."""
        return int(np.searchsorted(self.spans.start, self.char_bytes[char]))

    def char_at(self, i: int) -> int:
        """The character where token i starts."""
        return int(np.searchsorted(self.char_bytes, self.spans.start[i]))

    def fit(self, i: int, room: int, separator: int) -> int:
        """Where a segment from token i that fits in `room` tokens ends: all the rest (with the
        separator, when one follows), or as many tokens as fit back to the last cut (<= i: none)."""
        if len(self.spans.ids) - i + separator <= room:
            return len(self.spans.ids)
        k = int(np.searchsorted(self.cuts, i + room, "right")) - 1
        return int(self.cuts[k]) if k >= 0 else -1

    def next_cut(self, i: int) -> int:
        """The first cut after token i (the part's end when there is none)."""
        k = int(np.searchsorted(self.cuts, i, "right"))
        return int(self.cuts[k]) if k < len(self.cuts) else len(self.spans.ids)

    def segment(self, i: int, j: int, ends_document: bool) -> tuple[_Segment, int]:
        """(the segment of tokens [i, j), in its own bytes, the character after it)."""
        spans, starts = self.spans, self.spans.start
        byte_lo, byte_hi = starts[i], starts[j] if j < len(spans.ids) else spans.n_bytes
        char_lo, char_hi = (int(c) for c in np.searchsorted(self.char_bytes, [byte_lo, byte_hi]))
        bounds = spans.boundaries  # sorted: the segment's are a slice
        bounds = bounds[
            np.searchsorted(bounds, byte_lo) : np.searchsorted(bounds, byte_hi, "right")
        ]
        student = TokenSpans(  # the segment's tokens, in the segment's bytes
            ids=spans.ids[i:j],
            text=spans.text[i:j],
            start=starts[i:j] - byte_lo,
            cut=np.zeros(0, dtype=bool),  # not needed from here on
            boundaries=np.union1d(bounds - byte_lo, [0, byte_hi - byte_lo]),
            n_bytes=int(byte_hi - byte_lo),
        )
        segment = _Segment(student, self.text[char_lo:char_hi], ends_document, part=self, lo=i)
        return segment, char_hi


@dataclass
class _Window:
    """The window being filled: its segments and how many student tokens still fit."""

    size: int  # student tokens after the leading special tokens
    pack: bool  # several documents per window (False: one)
    separator: bool  # the student has an end-of-document token: it follows each document
    room: int = field(init=False)
    segments: list[_Segment] = field(default_factory=list)

    def __post_init__(self):
        self.room = self.size

    def add(self, seg: _Segment | None) -> bool:
        """Adds a segment (None: the next piece has no room); whether the window is now done:
        full, or no room for the next piece, or a document's end with pack=False."""
        if seg is not None:
            self.segments.append(seg)
            self.room -= len(seg.student.ids)
            self.room -= seg.ends_document and self.separator and seg.target is None
        done = seg is None or self.room <= 0 or (not self.pack and seg.ends_document)
        return done and bool(self.segments)

    def take(self) -> list[_Segment]:
        """Its segments; it is empty again."""
        segments, self.segments, self.room = self.segments, [], self.size
        return segments


class AlignedWindows(IterableDataset):
    """Windows of `seq_len` student tokens aligned with each teacher; see the module docstring.
    Documents come from `documents` (this worker's share, in order, from a resume position); this
    class packs them into windows and aligns every window with each teacher.

    Item (numpy arrays): student_ids [T], labels [T] (labels[p] = student_ids[p + 1], -100 at the
    end and for special targets other than the end-of-document token), tokens [] (the student
    tokens it trains on: T, or a conversation's targets, chat.py), and per teacher i:
    student_chunk_i [T], teacher_ids_i [Ti], teacher_chunk_i [Ti] (chunk ids after the predictor
    shift, -1 = none); position [7] = (rank, world_size, worker, num_workers, epoch, document,
    character) where this worker's NEXT window starts (document -1: the epoch's start); issues
    [len(REASONS)] = this worker's counts so far. With `teacher_window` (the teacher's own
    context) also teacher_pos_i [Ti] (position ids, restarting with each row) and, for a
    same-tokenizer teacher, teacher_at_i [T] (the teacher position that predicts the student's
    next token, -1 = none); with a teacher cache (`caches`, train.py --teacher-cache) the cached
    distributions of the positions in chunks (cache_*_i) instead of teacher_ids_i.
    `repeat=True` streams forever (epoch after epoch), as a trainer with --max-steps wants.
    Conversations (chat records) are cut and aligned by `chat`, a chat.Chat that train.py sets
    (chat.setup) when the data holds them; without it a conversation is counted and skipped.
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
        teacher_window=None,
        repeat=False,
        data_config=None,
        split="train",
        pack=True,
        shuffle=True,
        shuffle_buffer=10_000,
        seed=0,
    ):
        self.source = DocumentSource(
            data, resolve_files(data), text_field, data_config, split, shuffle, shuffle_buffer, seed
        )
        self.student_tok, self.teacher_toks = student_tok, list(teacher_toks)
        self.seq_len, self.start, self.repeat, self.pack = seq_len, start, repeat, pack
        self.rank, self.world_size = rank, world_size
        self.chat = None  # chat.setup: conversations are read in each side's chat template
        self.teacher_window = teacher_window or None  # None: the teacher reads the student's window
        self.teacher_cap = teacher_cap or 2 * seq_len + (teacher_window or 0)
        self.caches = None  # per teacher, a cache_teacher.TeacherCache (train.py --teacher-cache)
        if shuffle_buffer < 0:
            raise ValueError(f"--shuffle-buffer {shuffle_buffer}: give 0 (off) or more documents")
        # a same-tokenizer teacher reads the student's ids, bit for bit (no re-tokenization)
        student_hash = tokenizer_hash(student_tok)
        self.same = [tokenizer_hash(t) == student_hash for t in self.teacher_toks]
        self.prefix = [_own_prefix(t) for t in [student_tok, *self.teacher_toks]]
        self.eod = [end_of_document_id(t) for t in [student_tok, *self.teacher_toks]]
        if seq_len < len(self.prefix[0]) + 2:
            raise ValueError(
                f"--seq-len {seq_len} leaves no room after {len(self.prefix[0])} special tokens"
            )
        check_teacher_cap(self.teacher_cap, self.teacher_toks)
        pad = [
            t.pad_token_id if t.pad_token_id is not None else t.eos_token_id or 0
            for t in [student_tok, *self.teacher_toks]
        ]
        self.pad_ids = {"student_ids": pad[0]} | {
            f"teacher_ids_{i}": p for i, p in enumerate(pad[1:])
        }
        issues = Counter()
        if next(documents(replace(self.source, shuffle=False), 0, 0, 1, issues), None) is None:
            raise ValueError(
                f"--data {data}: no usable document ({dict(issues)}); check --text-field"
            )

    def __iter__(self):
        worker, workers, (epoch, doc, char), issues = resume_point(
            self.start, self.rank, self.world_size
        )
        # document i of the epoch's stream is this worker's when i % (world_size * workers) == shard
        shard, n_shards = self.rank + self.world_size * worker, self.world_size * workers
        while self.repeat or epoch == 0:
            produced = False
            docs = documents(self.source, epoch, shard, n_shards, issues, resume_doc=doc)
            for item, next_start in self._windows(docs, issues, doc, char):
                produced = True
                next_start = (epoch, *next_start) if next_start else (epoch + 1, -1, 0)
                where = [self.rank, self.world_size, worker, workers, *next_start]
                item["position"] = np.array(where)
                item["issues"] = np.array([issues[r] for r in REASONS])
                yield item
            if not produced and doc < 0:  # nothing in this shard: stop rather than spin
                _count(issues, "empty_shard", f"rank {self.rank} worker {worker} got no windows")
                return
            epoch, doc, char = epoch + 1, -1, 0

    def _windows(self, docs, issues: Counter, resume_doc: int, resume_char: int):
        """(item, where the next window starts: (document, character), or None at the stream's
        end) for the windows of a stream of (document, text), starting at character `resume_char`
        of document `resume_doc` (-1: from the start)."""
        window = _Window(self.seq_len - len(self.prefix[0]), self.pack, self.eod[0] is not None)
        for doc, text in docs:
            skip_to = resume_char if doc == resume_doc else 0
            for segments, next_char in self._pack(window, text, skip_to, issues):
                yield from self._emit(segments, issues, (doc, next_char))
        yield from self._emit(window.take(), issues, None)  # what is left at the stream's end

    def _emit(self, segments: list[_Segment], issues: Counter, next_start):
        """(the window of these segments, next_start), unless there are none or the window is too
        short to predict anything (counted)."""
        item = self._item(segments, issues) if segments else None
        if item is not None:
            yield item, next_start

    def _pack(self, window: _Window, text: str, skip_to: int, issues: Counter):
        """Adds one document from character `skip_to` to `window`: (segments, character where the
        next window starts) for each window it completes; the rest stays in `window`."""
        split_counted = skip_to > 0  # a resumed document was counted when it was first read
        chat = isinstance(text, Conversation)  # chat.py cuts it, each side in its own template
        if chat and self.chat is None:
            _count(issues, "chat_template", "a conversation in a file that begins with text")
            return
        pieces = self.chat.segments if chat else self._document_segments
        for seg, next_char in pieces(text, skip_to, issues, window):
            if not window.add(seg):
                continue
            if not window.segments[-1].ends_document and not split_counted:
                size = "a conversation" if chat else f"{len(text)} characters"
                _count(issues, "split_document", f"{size}, several windows")
                split_counted = True  # once per document: it continues elsewhere
            yield window.take(), next_char

    def _document_segments(self, text: str, skip_to: int, issues: Counter, window: _Window):
        """The pieces of one document from character `skip_to`, tokenized part by part (_parts):
        (segment or None, character of the document after it), as `_segments` gives them."""
        for part_start, part in _parts(text):
            if part_start + len(part) <= skip_to:
                continue
            ends_document = part_start + len(part) == len(text)
            start_char = max(skip_to - part_start, 0)
            pieces = self._segments(
                part, ends_document, issues, start_char, window, text, part_start
            )
            yield from ((seg, part_start + next_char) for seg, next_char in pieces)

    def _segments(self, part, ends_document, issues, start_char, window, document=None, offset=0):
        """The pieces of one document part for the window being filled, from character
        `start_char`: (segment, character after it), or (None, character of the next piece) when
        the window has no room for that piece (the caller closes it and the window is empty)."""
        spans = _body(token_spans(self.student_tok, part))
        n = len(spans.ids)
        if n == 0:
            return
        tokens = _Part(part, spans, document, offset)
        separator = int(ends_document and self.eod[0] is not None)  # it needs a place too
        i = tokens.token_at(start_char) if start_char else 0
        ended = False
        while i < n:
            j = tokens.fit(i, window.room, separator)
            if j > i:
                ended = ends_document and j == n
                yield tokens.segment(i, j, ended)
                i = j
            elif window.segments:  # no room for the next piece here
                yield None, tokens.char_at(i)
            else:  # no clean cut in a whole window (a normalized region): dropped
                _count(issues, "unsplittable_text", f"no clean cut in {window.room} tokens")
                i = tokens.next_cut(i + window.room)
        if ends_document and not ended:  # its tail was dropped: the document still ends here
            yield _BARE_END, len(part)

    def _item(self, segments: list[_Segment], issues: Counter) -> dict | None:
        """One window: the student's prefix, then each segment (+ the end-of-document token after a
        document's last one), and the same for every teacher with chunk ids numbered across the
        window (a chunk never crosses a segment). None (counted) when it predicts nothing."""
        ids, target = [self.prefix[0]], [np.zeros(len(self.prefix[0]), dtype=bool)]
        for seg in segments:
            ids.append(seg.student.ids)
            target.append(seg.student.text if seg.target is None else seg.target)
            if seg.ends_document and seg.target is None and self.eod[0] is not None:  # a target
                ids.append([self.eod[0]])
                target.append([True])
        ids = np.concatenate(ids).astype(np.int64)
        if len(ids) < 2:
            _count(issues, "too_short", "a window of one token predicts nothing")
            return None
        target = np.concatenate(target).astype(bool)
        labels = np.full(len(ids), -100, dtype=np.int64)
        labels[:-1] = np.where(target[1:], ids[1:], -100)
        # the student tokens it trains on: all but a conversation's untrained ones (chat: those of
        # the assistant's contents and ends of turn), less the prefix before a conversation
        chat = [len(s.target) - int(s.target.sum()) for s in segments if s.target is not None]
        tokens = len(ids) - sum(chat) - len(self.prefix[0]) * (segments[0].target is not None)
        item = {"student_ids": ids, "labels": labels, "tokens": np.array(tokens)}
        own = self.teacher_window and all(seg.target is None for seg in segments)
        for i in range(len(self.teacher_toks)):
            if own:  # documents: each teacher reads them in its own context (METHOD.md 4.3)
                item.update(self._own_context(i, segments, issues))
                continue
            s_chunk, teacher_ids, t_chunk = self._teacher_side(i, segments)
            _drop_unpredicted(s_chunk, t_chunk)
            s_chunk, teacher_ids, t_chunk = _capped(
                s_chunk, teacher_ids, t_chunk, self.teacher_cap, issues
            )
            item[f"student_chunk_{i}"] = predictor_chunks(s_chunk)
            item[f"teacher_ids_{i}"] = teacher_ids
            item[f"teacher_chunk_{i}"] = predictor_chunks(t_chunk)
        return item

    def _teacher_view(self, i: int, part: _Part):
        """(teacher i's tokens of a document part, the part's chunks on the student's side and on
        the teacher's), made once per part: the part's segments share them."""
        view = part.views.get(i)
        if view is None:
            tok = self.teacher_toks[i]
            teacher = part.spans if self.same[i] else _body(token_spans(tok, part.text))
            view = part.views[i] = (teacher, *chunk_ids(part.spans, teacher))
        return view

    def _own_context(self, i: int, segments: list[_Segment], issues: Counter) -> dict:
        """Teacher i's side of a window of documents by the teacher's own context (METHOD.md
        4.3): per segment, rows of [the teacher's prefix, its tokens of the part from the start
        of the teacher window (--teacher-window tokens) up to the segment's end]; the positions
        that predict the segment's whole chunks carry their chunk ids. The rows run one after the
        other, `teacher_pos_i` restarting at 0 with each: a row attends only to itself."""
        prefix, L = self.prefix[0] if self.same[i] else self.prefix[i + 1], self.teacher_window
        s_chunks, rows, first_free = [np.full(len(self.prefix[0]), -1)], [], 0
        for k, seg in enumerate(segments):
            s_chunk = np.full(len(seg.student.ids), -1)
            if seg.part is not None and len(seg.student.ids):
                teacher, s_part, t_part = self._teacher_view(i, seg.part)
                lo, hi = seg.lo, seg.lo + len(seg.student.ids)
                s_chunk = s_part[lo:hi].copy()
                # a chunk the student's cut runs through has tokens in another window: none here
                for out, inside in ((lo - 1, lo), (hi, hi - 1)):
                    if (
                        0 <= out < len(s_part)
                        and s_part[out] >= 0
                        and s_part[out] == s_part[inside]
                    ):
                        s_chunk[s_chunk == s_part[out]] = -1
                kept = s_chunk[s_chunk >= 0]
                if len(kept):
                    c0, c1 = int(kept.min()), int(kept.max())
                    t_in = np.flatnonzero((t_part >= c0) & (t_part <= c1))
                    u, v = (int(t_in[0]), int(t_in[-1]) + 1) if len(t_in) else (0, 0)
                    for w in range(u // L, (v - 1) // L + 1):  # the teacher windows it touches
                        a, b = w * L, min((w + 1) * L, v)
                        chunk = np.where((t_part[a:b] >= c0) & (t_part[a:b] <= c1), t_part[a:b], -1)
                        chunk = np.where(chunk >= 0, chunk - c0 + first_free, -1)
                        token = np.arange(a, b)
                        pad = np.full(len(prefix), -1)
                        ids = np.concatenate([prefix, teacher.ids[a:b]])
                        rows.append(
                            [ids, np.concatenate([pad, chunk]), np.concatenate([pad, token]), k]
                        )
                    s_chunk = np.where(s_chunk >= 0, s_chunk - c0 + first_free, -1)
                    first_free += c1 - c0 + 1
            s_chunks.append(s_chunk)
            if seg.ends_document and self.eod[0] is not None:
                s_chunks.append([-1])
        s_chunk = np.concatenate(s_chunks).astype(np.int64)
        ids, chunk, token, seg_of, pos = [], [], [], [], []
        for row in rows:
            first = row[1][0]
            if not len(prefix) and first >= 0:  # the row's first token: no predictor
                s_chunk[s_chunk == first] = -1
                for other in rows:
                    other[1] = np.where(other[1] == first, -1, other[1])
        for row_ids, row_chunk, row_token, k in rows:  # the predictor shift, row by row
            ids.append(row_ids)
            chunk.append(predictor_chunks(row_chunk))
            token.append(predictor_chunks(row_token))
            seg_of.append(np.full(len(row_ids), k))
            pos.append(np.arange(len(row_ids)))
        empty = np.zeros(0, dtype=np.int64)
        ids, chunk, token, seg_of, pos = (
            np.concatenate(x or [empty]).astype(np.int64) for x in (ids, chunk, token, seg_of, pos)
        )
        if s_chunk[0] >= 0:  # the student's first token: no predictor (a student without BOS)
            chunk[chunk == s_chunk[0]] = -1
            s_chunk[s_chunk == s_chunk[0]] = -1
        if len(ids) > self.teacher_cap:  # rows beyond --teacher-cap: their chunks are a gap
            _count(issues, "teacher_truncated", f"{len(ids)} > {self.teacher_cap} tokens")
            lost = chunk[self.teacher_cap :]
            if (lost >= 0).any():
                first_lost = lost[lost >= 0].min()
                s_chunk[s_chunk >= first_lost] = -1
                chunk[chunk >= first_lost] = -1
            ids, chunk, token, seg_of, pos = (
                x[: self.teacher_cap] for x in (ids, chunk, token, seg_of, pos)
            )
        chunk[~np.isin(chunk, s_chunk)] = -1  # a chunk with no student side: no signal, no lookup
        s_chunk[~np.isin(s_chunk, chunk)] = -1
        token[chunk < 0] = -1  # only the kept chunks' tokens are looked up or matched
        out = {f"student_chunk_{i}": predictor_chunks(s_chunk), f"teacher_chunk_{i}": chunk}
        cache = self.caches[i] if self.caches else None
        if cache is not None:  # the cached distributions replace the teacher's forward
            keep = chunk >= 0
            out[f"teacher_chunk_{i}"] = chunk[keep]
            for key, value in self._cached(i, cache, segments, token, seg_of, keep).items():
                out[f"{key}_{i}"] = value
            token, seg_of = token[keep], seg_of[keep]
        else:
            out[f"teacher_ids_{i}"], out[f"teacher_pos_{i}"] = ids, pos
        if self.same[i]:  # KL: the teacher position that predicts the student's next token
            out[f"teacher_at_{i}"] = self._same_positions(segments, token, seg_of)
        return out

    def _same_positions(self, segments, token, seg_of) -> np.ndarray:
        """[T] for each student position, the teacher position that predicts the same token of the
        same part (a same-tokenizer teacher tokenizes it as the student does), -1 where none."""
        keys, n = {}, len(self.prefix[0])
        for k, seg in enumerate(segments):
            for j in range(len(seg.student.ids)):
                keys[(k, seg.lo + j)] = n + j - 1  # the student position that predicts it
            n += len(seg.student.ids) + (seg.ends_document and self.eod[0] is not None)
        at = np.full(n, -1, dtype=np.int64)
        for q in np.flatnonzero(token >= 0):
            p = keys.get((int(seg_of[q]), int(token[q])), -1)
            if p >= 0:
                at[p] = q
        return at

    def _cached(self, i: int, cache, segments, token, seg_of, keep) -> dict:
        """The cached teacher distributions of the kept positions, read part by part; the cache
        checks that its tokens are the teacher's (cache_teacher.TeacherCache.read)."""
        parts = {}
        for q in np.flatnonzero(keep):
            parts.setdefault(int(seg_of[q]), []).append(q)
        values = []
        for k, qs in parts.items():
            part, qs = segments[k].part, np.array(qs)
            teacher = self._teacher_view(i, part)[0]
            values.append(cache.read(part.document, part.offset, token[qs], teacher.ids))
        return cache.stack(values, int(keep.sum()))

    def _teacher_side(self, i: int, segments: list[_Segment]):
        """(student chunk ids, teacher ids, teacher chunk ids) of a window for teacher i, before
        the predictor shift: the teacher's own prefix, each segment tokenized by the teacher, and
        its own end-of-document token after a document's last segment (in no chunk)."""
        same, tok = self.same[i], self.teacher_toks[i]
        prefix = self.prefix[0] if same else self.prefix[i + 1]
        eod = self.eod[0] if same else self.eod[i + 1]
        s_chunks, t_ids, t_chunks = [np.full(len(self.prefix[0]), -1)], [prefix], []
        t_chunks.append(np.full(len(prefix), -1))
        first_free = 0
        for seg in segments:
            if seg.template is not None:  # chat: the teacher's own template tokens (chat.py)
                s_chunk, teacher_ids, t_chunk = seg.template.side(i)
            elif seg.text:
                teacher = seg.student if same else _body(token_spans(tok, seg.text))
                teacher_ids = teacher.ids
                if seg.target is None or seg.target.any():
                    s_chunk, t_chunk = chunk_ids(seg.student, teacher)
                else:  # chat: a content it does not train on is in no chunk
                    s_chunk, t_chunk = (np.full(len(x.ids), -1) for x in (seg.student, teacher))
            if seg.text or seg.template is not None:
                s_chunks.append(np.where(s_chunk >= 0, s_chunk + first_free, -1))
                t_chunks.append(np.where(t_chunk >= 0, t_chunk + first_free, -1))
                t_ids.append(teacher_ids)
                first_free += max(s_chunk.max(initial=-1), t_chunk.max(initial=-1)) + 1
            if seg.target is not None:  # a conversation's end is its template's: no separator
                continue
            if seg.ends_document and self.eod[0] is not None:
                s_chunks.append([-1])
            if seg.ends_document and eod is not None:
                t_ids.append([eod])
                t_chunks.append([-1])
        return tuple(np.concatenate(x).astype(np.int64) for x in (s_chunks, t_ids, t_chunks))


def _drop_unpredicted(s_chunk: np.ndarray, t_chunk: np.ndarray) -> None:
    """A side's first token has no predictor position: its chunk would lack a piece on that side
    (Qwen3 and o200k add no BOS), so it is dropped on both sides (in place)."""
    for first in {int(s_chunk[0]), int(t_chunk[0]) if len(t_chunk) else -1} - {-1}:
        s_chunk[s_chunk == first] = -1
        t_chunk[t_chunk == first] = -1


def _capped(s_chunk, teacher_ids, t_chunk, cap: int, issues: Counter):
    """(s_chunk, teacher_ids, t_chunk) with at most `cap` teacher tokens (counted when cut): the
    chunks that lose teacher tokens become a gap."""
    if len(t_chunk) <= cap:
        return s_chunk, teacher_ids, t_chunk
    _count(issues, "teacher_truncated", f"{len(t_chunk)} > {cap} tokens")
    dropped = t_chunk[cap:]
    t_chunk, teacher_ids = t_chunk[:cap], teacher_ids[:cap]
    if (dropped >= 0).any():  # chunk ids follow the text: all from the first lost one
        first_lost = dropped[dropped >= 0].min()
        s_chunk = np.where(s_chunk >= first_lost, -1, s_chunk)
        t_chunk = np.where(t_chunk >= first_lost, -1, t_chunk)
    return s_chunk, teacher_ids, t_chunk


def collate(batch: list[dict], pad_ids: dict[str, int]) -> dict[str, torch.Tensor]:
    """Pad each key to its longest row: ids with pad_ids[key] (+ a 0/1 mask: student_mask,
    teacher_mask_i), labels with -100, chunks with -1; position, issues and tokens are stacked."""
    out = {}
    for key in batch[0]:
        rows = [torch.as_tensor(item[key]) for item in batch]
        if key in ("position", "issues", "tokens"):
            out[key] = torch.stack(rows)
            continue
        is_ids = key in pad_ids  # student_ids, teacher_ids_i
        fill = pad_ids[key] if is_ids else -100 if key == "labels" else -1
        fill = 0 if key.startswith(("teacher_pos", "cache_")) else fill
        out[key] = pad_sequence(rows, batch_first=True, padding_value=fill)
        if is_ids:
            ones = [torch.ones(len(r), dtype=torch.long) for r in rows]
            out[key.replace("_ids", "_mask")] = pad_sequence(ones, batch_first=True)
    return out


def advance_state(state: dict | None, batch: dict) -> dict:
    """The resume state once the trainer has consumed `batch`: call it for every batch, in order.

    A batch comes from one DataLoader worker; the DataLoader takes batches from its workers in
    turn, so the state keeps where each worker's next window starts and whose turn is next. Save
    it (each rank its own) and pass it back as AlignedWindows(start=...) with the same ranks and
    num_workers.
    """
    rank, world_size, worker, workers, epoch, doc, char = batch["position"][-1].tolist()
    state = state or {
        "format": STATE_FORMAT,
        "rank": rank,
        "world_size": world_size,
        "num_workers": workers,
        "positions": [None] * workers,
        "issues": [[0] * len(REASONS) for _ in range(workers)],
    }
    state = {**state, "positions": list(state["positions"]), "issues": list(state["issues"])}
    state["positions"][worker] = [epoch, doc, char]
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
