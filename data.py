"""Text data for train.py: documents -> shuffled, packed windows of `seq_len` student tokens, each
aligned with every teacher (align.py, METHOD.md section 4), tokenized inside DataLoader workers.

- `--data`: local .txt (one file = one document), .jsonl (one JSON object per line) or .parquet
  files, a directory of them or a glob; anything else is a hub dataset name, streamed
  (`data_config`, `split`).
- Order (`shuffle=True`): each epoch, a seeded order of the files (and of a hub dataset's shards),
  `INTERLEAVE` files read at a time in turn, then a seeded buffer of `shuffle_buffer` documents per
  DataLoader worker. It mixes documents across files and within the buffer's reach; it does not
  shuffle a single huge file globally (a buffer draws from what has been read).
- A window (packing, the default): the student's own leading special tokens (Llama: BOS), then
  consecutive documents, each followed by the student's end-of-document token, up to `seq_len`
  tokens; a long document continues in the next window. Each document piece (segment) is cut where
  the student has an exact token boundary on a character boundary. Every teacher tokenizes exactly
  each segment's text and gets its own leading special tokens and its own end-of-document token;
  a same-tokenizer teacher gets the student's ids. Chunks never cross a segment; separators and
  special tokens belong to no chunk; a chunk holding a side's first token (no predictor position)
  is dropped on both sides. `pack=False`: one document per window.
- Sharding: document i of the epoch's stream belongs to rank i % world_size and, within the rank,
  to DataLoader worker (i // world_size) % num_workers.
- Resume: every window carries where its worker's next window starts (epoch, document, character);
  `advance_state` folds consumed batches into a small state that train.py saves and passes back as
  `start=`: the order is replayed without tokenizing, so a resumed run sees the same windows.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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
INTERLEAVE = 8  # files read at a time, in turn, when shuffling
STATE_FORMAT = 2  # 2: packed windows; a resume state records where the next window starts
# why a document, file or window was skipped, split or cut (counted, see issue_counts)
REASONS = tuple(
    "empty_file unreadable_file bad_json missing_text_field empty_document invalid_utf8 "
    "split_document too_short teacher_truncated unsplittable_text empty_shard".split()
)
_warned: set[str] = set()
Parse = Callable[[Counter], "str | None"]  # a document's text (or None), read only when needed


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
            yield path, lambda issues: _read_txt(path, issues)
    elif path.endswith(".parquet"):
        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise LookupError(f"{path} has no column {text_field!r}")
        for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):  # bounded
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


def _read_txt(path: str, issues: Counter) -> str | None:
    try:
        with open(path, "rb") as f:
            return _text(f.read(), issues, path)
    except OSError as e:  # removed or unreadable since the listing: counted, never fatal
        _count(issues, "unreadable_file", f"{path}: {e.strerror}")
        return None


def _problem(reason: str, detail: str) -> Parse:
    """A file-level problem as a document of its own: counted when its shard reads it, exactly once
    (a resumed run replays the order without reading what it skips)."""

    def parse(issues: Counter) -> None:
        _count(issues, reason, detail)

    return parse


def _file_documents(path: str, text_field: str) -> Iterator[Parse]:
    """One file's documents; a file that cannot be read is counted and skipped: an unreadable
    file must not stop a long run."""
    produced = False
    try:
        for _, parse in _records(path, text_field):
            produced = True
            yield parse
    except LookupError as e:
        yield _problem("missing_text_field", str(e))
    except (OSError, ValueError, pa.ArrowException) as e:  # I/O; a damaged or odd parquet file
        yield _problem("unreadable_file", f"{path}: {type(e).__name__}: {str(e)[:80]}")
    else:
        if not produced:
            yield _problem("empty_file", path)


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


def _hub_documents(name, text_field, config, split, shard, n_shards, seed, epoch, shuffle):
    """A hub dataset's documents for one shard: `datasets` streams it and splits it by shard (by
    file, or by example); with shuffle, its files come in a seeded order, reseeded per epoch."""
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except (OSError, datasets.exceptions.DatasetNotFoundError) as e:  # offline, or no such name
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(
            f"--data {name}: cannot load this hub dataset ({why}); check the name "
            "and the network, or pass local files"
        ) from None
    if shuffle:  # the order of the dataset's files; documents are mixed by our own buffer
        stream = stream.shuffle(seed=seed, buffer_size=1)
        stream.set_epoch(epoch)
    stream = split_dataset_by_node(stream, rank=shard, world_size=n_shards)
    # .iter(): plain iteration inside a DataLoader worker would split again, by the worker's own id
    for index, row in enumerate(stream.iter(batch_size=1)):
        value = row.get(text_field, [None])[0]
        yield lambda issues, value=value, index=index: _text(value, issues, f"{name} row {index}")


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


@dataclass
class _Window:
    """The window being filled: its segments and how many student tokens still fit."""

    room: int
    segments: list = field(default_factory=list)


@dataclass
class _Segment:
    """A piece of one document inside a window: the student's tokens of it (in the segment's own
    bytes), its text, and whether the document ends with it (then an end-of-document token
    follows)."""

    student: TokenSpans
    text: str
    ends_document: bool


class AlignedWindows(IterableDataset):
    """Windows of `seq_len` student tokens aligned with each teacher; see the module docstring.

    Item (numpy arrays): student_ids [T], labels [T] (labels[p] = student_ids[p + 1], -100 at the
    end and for special targets other than the end-of-document token), and per teacher i:
    student_chunk_i [T], teacher_ids_i [Ti], teacher_chunk_i [Ti] (chunk ids after the predictor
    shift, -1 = none); student_chunk is student_chunk_0; position [7] = (rank, world_size, worker,
    num_workers, epoch, document, character) where this worker's NEXT window starts (document -1:
    the epoch's start); issues [len(REASONS)] = this worker's counts so far.
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
        pack=True,
        shuffle=True,
        shuffle_buffer=10_000,
        seed=0,
    ):
        self.data, self.files = data, resolve_files(data)
        self.student_tok, self.teacher_toks = student_tok, list(teacher_toks)
        self.seq_len, self.text_field, self.start, self.repeat = seq_len, text_field, start, repeat
        self.rank, self.world_size = rank, world_size
        self.teacher_cap = teacher_cap or 2 * seq_len
        self.hub_args = (data_config, split)
        self.pack, self.shuffle, self.shuffle_buffer, self.seed = (
            pack,
            shuffle,
            shuffle_buffer,
            seed,
        )
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
        pad = [
            t.pad_token_id if t.pad_token_id is not None else t.eos_token_id or 0
            for t in [student_tok, *self.teacher_toks]
        ]
        self.pad_ids = {"student_ids": pad[0]} | {
            f"teacher_ids_{i}": p for i, p in enumerate(pad[1:])
        }
        issues = Counter()
        if not any(parse(issues) for parse in self._documents(0, 0, 1, shuffle=False)):
            raise ValueError(
                f"--data {data}: no usable document ({dict(issues)}); check --text-field"
            )

    def _documents(self, epoch: int, shard: int, n_shards: int, shuffle: bool | None = None):
        """This shard's documents (unparsed) in this epoch's order (see the module docstring)."""
        shuffle = self.shuffle if shuffle is None else shuffle
        if self.files is None:
            hub = (self.data, self.text_field, *self.hub_args, shard, n_shards)
            stream = _hub_documents(*hub, self.seed, epoch, shuffle)
        else:
            files = list(self.files)
            if shuffle:
                random.Random(f"files {self.seed} {epoch}").shuffle(files)
            width = INTERLEAVE if shuffle else 1
            everything = _interleaved(files, self.text_field, width)
            stream = (parse for i, parse in enumerate(everything) if i % n_shards == shard)
        if shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"documents {self.seed} {epoch} {shard} {n_shards}")
            stream = _shuffled(stream, self.shuffle_buffer, rng)
        return stream

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        state = self.start or {}
        if state and state.get("format") != STATE_FORMAT:
            raise ValueError(
                "the saved data position comes from an older data pipeline (unpacked windows): "
                "start a new run (another --out-dir), or resume with the version that wrote it"
            )
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
        resume = state["positions"][worker] if state else None  # where its next window starts
        issues = Counter(dict(zip(REASONS, state["issues"][worker]))) if state else Counter()
        epoch, doc, char = resume or (0, -1, 0)
        # document i of the epoch's stream is this worker's when i % (world_size * workers) == shard
        shard, n_shards = self.rank + self.world_size * worker, self.world_size * workers
        while self.repeat or epoch == 0:
            produced = False
            documents = self._documents(epoch, shard, n_shards)
            for item, next_start in self._windows(documents, issues, doc, char):
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

    def _windows(self, documents, issues: Counter, resume_doc: int, resume_char: int):
        """(item, where the next window starts: (document, character), or None at the stream's
        end) for the windows of a document stream, starting at character `resume_char` of document
        `resume_doc` (-1: from the start)."""
        window = _Window(self.seq_len - len(self.prefix[0]))

        def emit():
            item = self._item(window.segments, issues)
            window.segments, window.room = [], self.seq_len - len(self.prefix[0])
            return item

        for doc, parse in enumerate(documents):
            if doc < resume_doc:
                continue  # replayed, not read: the saved counts already hold its problems
            inside = doc == resume_doc  # read before the saved window: counted then
            text = parse(Counter() if inside else issues)
            if text is None:
                continue
            skip_to, split_counted = (resume_char if inside else 0), inside and resume_char > 0
            for part_start, part in _parts(text):
                if part_start + len(part) <= skip_to:
                    continue
                ends_document = part_start + len(part) == len(text)
                start_char = max(skip_to - part_start, 0)
                pieces = self._segments(part, ends_document, issues, start_char, window)
                for seg, next_char in pieces:
                    if seg is not None:
                        window.segments.append(seg)
                        window.room -= len(seg.student.ids)
                        window.room -= seg.ends_document and self.eod[0] is not None
                    # the window is done: full, or no room for the next piece, or --no-pack
                    done = seg is None or window.room <= 0 or (not self.pack and seg.ends_document)
                    if done and window.segments:
                        if not window.segments[-1].ends_document and not split_counted:
                            _count(
                                issues, "split_document", f"{len(text)} characters, several windows"
                            )
                            split_counted = True  # once per document: it continues elsewhere
                        item = emit()
                        if item is not None:
                            yield item, (doc, part_start + next_char)
        if window.segments:
            item = emit()
            if item is not None:
                yield item, None

    def _segments(self, part, ends_document, issues, start_char, window):
        """The pieces of one document part for the window being filled, from character
        `start_char`: (segment, character after it), or (None, character of the next piece) when
        the window has no room for that piece (the caller closes it and the window is empty)."""
        spans = _body(token_spans(self.student_tok, part))
        n, starts = len(spans.ids), spans.start
        if n == 0:
            return
        char_bytes = char_byte_offsets(part)
        on_char = np.zeros(spans.n_bytes + 1, dtype=bool)
        on_char[char_bytes] = True
        # a segment may start before token k when k starts at an exact boundary of the student's
        # that is also a character boundary (the segment's text must be a string)
        cuts = np.flatnonzero(spans.cut & on_char[starts])
        # ...and never right after a token of no source bytes (a SentencePiece model's prefix
        # space): that token would be a piece of its own, and a resume would repeat it
        cuts = cuts[(cuts == 0) | (starts[cuts] > starts[np.maximum(cuts - 1, 0)])]
        eod = int(ends_document and self.eod[0] is not None)  # the separator needs a place too
        i = int(np.searchsorted(starts, char_bytes[start_char])) if start_char else 0
        ended = False
        while i < n:
            r = window.room
            if n - i + eod <= r:
                j = n
            else:  # as many tokens as fit, back to the last cut
                k = int(np.searchsorted(cuts, i + r, "right")) - 1
                j = int(cuts[k]) if k >= 0 else -1
            if j <= i:
                if window.segments:
                    yield None, int(np.searchsorted(char_bytes, starts[i]))
                    continue
                _count(issues, "unsplittable_text", f"no clean cut in {r} tokens")
                k = int(np.searchsorted(cuts, i + r, "right"))  # a normalized region: dropped
                i = int(cuts[k]) if k < len(cuts) else n
                continue
            byte_lo, byte_hi = starts[i], starts[j] if j < n else spans.n_bytes
            char_lo, char_hi = (int(c) for c in np.searchsorted(char_bytes, [byte_lo, byte_hi]))
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
            ended = ends_document and j == n
            yield _Segment(student, part[char_lo:char_hi], ended), char_hi
            i = j
        if ends_document and not ended:  # its tail was dropped: the document still ends here
            empty = TokenSpans(
                [],
                np.zeros(0, bool),
                np.zeros(0, np.int64),
                np.zeros(0, bool),
                np.zeros(1, np.int64),
                0,
            )
            yield _Segment(empty, "", True), len(part)

    def _item(self, segments: list[_Segment], issues: Counter) -> dict | None:
        """One window: the student's prefix, then each segment (+ the end-of-document token after a
        document's last one), and the same for every teacher with chunk ids numbered across the
        window (a chunk never crosses a segment)."""
        n_teachers = len(self.teacher_toks)
        ids, target = [self.prefix[0]], [np.zeros(len(self.prefix[0]), dtype=bool)]
        s_chunks = [[np.full(len(self.prefix[0]), -1)] for _ in range(n_teachers)]
        t_ids = [
            [self.prefix[0] if same else prefix] for same, prefix in zip(self.same, self.prefix[1:])
        ]
        t_chunks = [[np.full(len(t[0]), -1)] for t in t_ids]
        first_free = [0] * n_teachers
        for seg in segments:
            ids.append(seg.student.ids)
            target.append(seg.student.text)
            for i, tok in enumerate(self.teacher_toks if seg.text else []):
                teacher = seg.student if self.same[i] else _body(token_spans(tok, seg.text))
                s_chunk, t_chunk = chunk_ids(seg.student, teacher)
                s_chunks[i].append(np.where(s_chunk >= 0, s_chunk + first_free[i], -1))
                t_chunks[i].append(np.where(t_chunk >= 0, t_chunk + first_free[i], -1))
                t_ids[i].append(teacher.ids)
                first_free[i] += max(s_chunk.max(initial=-1), t_chunk.max(initial=-1)) + 1
            if seg.ends_document:  # the separators: a CE target for the student, in no chunk
                if self.eod[0] is not None:
                    ids.append([self.eod[0]])
                    target.append([True])
                    for chunks in s_chunks:
                        chunks.append([-1])
                for i in range(n_teachers):
                    eod = self.eod[0] if self.same[i] else self.eod[i + 1]
                    if eod is not None:
                        t_ids[i].append([eod])
                        t_chunks[i].append([-1])
        ids = np.concatenate(ids).astype(np.int64)
        if len(ids) < 2:
            _count(issues, "too_short", "a window of one token predicts nothing")
            return None
        target = np.concatenate(target).astype(bool)
        labels = np.full(len(ids), -100, dtype=np.int64)
        labels[:-1] = np.where(target[1:], ids[1:], -100)
        item = {"student_ids": ids, "labels": labels}
        for i in range(n_teachers):
            s_chunk = np.concatenate(s_chunks[i]).astype(np.int64)
            t_chunk = np.concatenate(t_chunks[i]).astype(np.int64)
            teacher_ids = np.concatenate(t_ids[i]).astype(np.int64)
            # a side's first token has no predictor position: its chunk would lack a piece on that
            # side (Qwen3 and o200k add no BOS), so it is dropped on both sides
            for first in {int(s_chunk[0]), int(t_chunk[0]) if len(t_chunk) else -1} - {-1}:
                s_chunk[s_chunk == first] = -1
                t_chunk[t_chunk == first] = -1
            if len(t_chunk) > self.teacher_cap:  # the chunks that lose teacher tokens become a gap
                _count(issues, "teacher_truncated", f"{len(t_chunk)} > {self.teacher_cap} tokens")
                dropped = t_chunk[self.teacher_cap :]
                t_chunk, teacher_ids = t_chunk[: self.teacher_cap], teacher_ids[: self.teacher_cap]
                if (dropped >= 0).any():  # chunk ids follow the text: all from the first lost one
                    first_lost = dropped[dropped >= 0].min()
                    s_chunk = np.where(s_chunk >= first_lost, -1, s_chunk)
                    t_chunk = np.where(t_chunk >= first_lost, -1, t_chunk)
            item[f"student_chunk_{i}"] = predictor_chunks(s_chunk)
            item[f"teacher_ids_{i}"] = teacher_ids
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
