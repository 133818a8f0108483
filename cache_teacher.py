"""Run a teacher once over a dataset and keep its next-token distributions, in the TEACHER's
vocabulary, for any student to distil from: train.py --teacher-cache DIR (METHOD.md 4.3, 5.7).

    python cache_teacher.py --teacher Qwen/Qwen3-4B --data PATH --out DIR --topk 64
    torchrun --nproc_per_node=8 cache_teacher.py --teacher Qwen/Qwen3-4B --data PATH --out DIR
    python cache_teacher.py --preset tiny --teacher pkg:qwen3 --out DIR    # CPU, no downloads

Why it can serve any student: the teacher reads each document in its own context (each document
alone, in windows of --teacher-window teacher tokens: data.py, METHOD.md 4.3), so what it predicts
at every one of its tokens depends on the teacher and the document only. The cache keeps, per
teacher token, the teacher's token id, where it starts in the document's bytes, and the
distribution that predicts it: the top-K log-probabilities with their ids and the log of the mass
left (K ids + one "rest" bucket: a complete distribution); --topk 0 keeps the whole vocabulary in
float32 (exact). A student is aligned with the cached teacher tokens at training time by bytes,
as with a teacher that runs.

On disk (DIR): manifest.json (format, teacher and its tokenizer hash, its weights' identity, K,
the storage dtype, the teacher's context rule, the data), then per rank shards: shard-R-N.npy, one
fixed-size record per teacher token (numpy structured array, memory-mapped when read), and
shard-R-N.json, its index: per document its content hash, its first record, its parts and a
crc32 per teacher window of records. A shard is complete when its index exists; both files are
written atomically, the index last, so a killed pass leaves no shard that looks complete, and a
rerun resumes after the last complete shard. Ranks split the documents (document g belongs to
rank g % world size), every rank writes its own shards (several nodes may share --out).

Record layouts (--dtype, for K > 0), bytes per teacher token:
  packed  (default) 16 + 4K: each entry one uint32, the id in its low 18 bits and -log p as a
          float16 without its sign and last mantissa bit (relative precision 2^-10, better than
          bfloat16's 2^-8) in the high 14; for vocabularies of up to 262,144 ids (Qwen3, o200k).
  float16 16 + 6K: int32 ids, float16 log-probabilities.   float32 16 + 8K: exact values.
  (16: the token id, its first byte, the log-sum-exp of the logits and the rest's log-mass.)
  --topk 0: 8 + 4|V|, the float32 logits of every id (exact: what the loss would have read).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import zlib
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch

import cli
import run_dir
from align import token_spans
from data import (
    DocumentSource,
    _body,
    _own_prefix,
    _parts,
    documents,
    resolve_files,
)
from flags import PRESETS, make_tiny_corpus
from tokens import load_tokenizer, tokenizer_hash

FORMAT = 1
ID_BITS = 18  # packed: ids below 2^18 = 262,144
DTYPES = ("packed", "float16", "float32")


def record_dtype(topk: int, dtype: str, vocab: int) -> np.dtype:
    """One teacher token's record: its id, its first byte in the document, and the distribution
    that predicts it (see the module docstring)."""
    head = [("token", "<i4"), ("start", "<u4")]
    if topk == 0:
        return np.dtype([*head, ("logits", "<f4", (vocab,))])
    head += [("lse", "<f4"), ("rest", "<f4")]
    if dtype == "packed":
        return np.dtype([*head, ("top", "<u4", (topk,))])
    return np.dtype([*head, ("ids", "<i4", (topk,)), ("logp", DTYPE_NP[dtype], (topk,))])


DTYPE_NP = {"float16": "<f2", "float32": "<f4"}


def pack(ids: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """(id, log p) -> uint32: id | code << 18, code = the float16 bits of -log p (sign bit 0)
    without the last mantissa bit: the nearer of the two 14-bit neighbours (at most 2^-10 of the
    value away; -log p above 65,504, the largest float16, is kept as 65,504)."""
    neg = np.minimum(-logp.astype(np.float32), 65504.0)
    low = neg.astype(np.float16).view(np.uint16).astype(np.uint32) >> 1
    high = np.minimum(low + 1, 0x3DFF)  # 0x3E00 << 1 would be float16's infinity
    up = np.abs(_decode(high) - neg) < np.abs(_decode(low) - neg)
    return ids.astype(np.uint32) | (np.where(up, high, low) << ID_BITS)


def _decode(code: np.ndarray) -> np.ndarray:
    return (code << 1).astype(np.uint16).view(np.float16).astype(np.float32)


def unpack(top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint32 -> (ids int64, log p float32)."""
    return (top & ((1 << ID_BITS) - 1)).astype(np.int64), -_decode(top >> ID_BITS)


def document_key(text: str) -> str:
    """A document's identity in a cache: a hash of its text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def weights_identity(name: str, preset: str | None, seed: int) -> str:
    """What names a teacher's weights without loading them (train.py checks it with the model
    not loaded): a preset's random model by its preset and seed; a local directory by its
    config.json and its weight files' names, sizes and first MiB; a hub name by the local
    snapshot's commit when there is one, else by its name (unverified)."""
    if name.startswith("pkg:") and not os.path.isdir(name):
        return f"preset {preset} seed {seed} {name}"
    if os.path.isdir(name):
        digest = hashlib.sha256()
        for file in sorted(os.listdir(name)):
            path = os.path.join(name, file)
            if file == "config.json" or file.endswith((".safetensors", ".bin", ".pt")):
                digest.update(f"{file}:{os.path.getsize(path)}".encode())
                with open(path, "rb") as f:
                    digest.update(f.read(1 << 20))
        return "files " + digest.hexdigest()
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
        if isinstance(found, str):
            return "hub " + found.split(os.sep + "snapshots" + os.sep)[1].split(os.sep)[0]
    except (ImportError, IndexError, ValueError):
        pass
    return f"hub {name} (no local snapshot: unverified)"


# ----------------------------------------------------------------------------- reading


def short(value) -> str:
    """A manifest value in an error line."""
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


class CacheError(ValueError):
    """A cache that does not serve this run: one line, naming what differs."""


class TeacherCache:
    """A cache directory as train.py reads it: `check` against the run, then `read` the records
    of a document part's teacher tokens (data.py calls it in the DataLoader workers)."""

    def __init__(self, directory: str, tok):
        path = os.path.join(directory, "manifest.json")
        if not os.path.isfile(path):
            raise CacheError(f"--teacher-cache {directory}: no manifest.json: not a teacher cache")
        with open(path, "rb") as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise CacheError(
                f"--teacher-cache {directory}: format {self.manifest.get('format')}, this code "
                f"reads {FORMAT}: rebuild it with cache_teacher.py"
            )
        self.directory, self.tok = directory, tok
        self.topk, self.vocab = self.manifest["topk"], self.manifest["vocab"]
        self.dtype = record_dtype(self.topk, self.manifest["dtype"], self.vocab)
        self.index: dict[str, tuple] = {}  # document key -> (shard, first record, parts)
        self.shards, self.arrays, self.checked = [], {}, set()
        for name in sorted(os.listdir(directory)):
            if name.startswith("shard-") and name.endswith(".json"):
                self._add_shard(name[: -len(".json")])
        if not self.shards:
            raise CacheError(f"--teacher-cache {directory}: no complete shard: run its pass")

    def _add_shard(self, stem: str) -> None:
        with open(os.path.join(self.directory, stem + ".json"), "rb") as f:
            shard = json.load(f)
        path = os.path.join(self.directory, stem + ".npy")
        want = shard["records"] * self.dtype.itemsize
        have = os.path.getsize(path) - shard["header"] if os.path.exists(path) else -1
        if have != want:
            raise CacheError(
                f"--teacher-cache {self.directory}: {stem}.npy holds {max(have, 0)} bytes of "
                f"records, its index {want}: a damaged or truncated shard; rerun the pass"
            )
        k = len(self.shards)
        self.shards.append((path, shard["header"], shard["records"]))
        for key, first, parts in shard["documents"]:
            self.index.setdefault(key, (k, first, {p[0]: p[1:] for p in parts}))

    def check(self, teacher: str, tok_hash: str, weights: str, rule: dict) -> None:
        """The cache serves this teacher: the same name, tokenizer, weights and context rule;
        else one line naming what differs."""
        now = {"teacher": teacher, "tokenizer_hash": tok_hash, "weights": weights, "rule": rule}
        for key, value in now.items():
            self._same(key, value)

    def check_data(self, data_files: dict | None) -> None:
        """...and these documents: the same data files (names and sizes)."""
        self._same("data_files", data_files)

    def _same(self, key: str, value) -> None:
        was = self.manifest.get(key)
        if was != value:
            raise CacheError(
                f"--teacher-cache {self.directory} was made with {key} {short(was)}, this run "
                f"has {short(value)}: make a cache for this run (cache_teacher.py)"
            )

    def _array(self, k: int) -> np.ndarray:
        """Shard k's records, memory-mapped (opened in the process that reads: a worker)."""
        if k not in self.arrays:
            path, header, n = self.shards[k]
            self.arrays[k] = np.memmap(path, self.dtype, "r", offset=header, shape=(n,))
        return self.arrays[k]

    def read(self, document: str, offset: int, tokens: np.ndarray, ids) -> dict:
        """The records of teacher tokens `tokens` of the part at character `offset` of `document`
        (whose teacher ids are `ids`), each teacher window they touch checked once (crc32);
        {"logp"} (K = 0) or {"ids", "logp", "rest"}."""
        key = document_key(document)
        found = self.index.get(key)
        if found is None:
            raise CacheError(
                f"--teacher-cache {self.directory} has no document {key} ({document[:40]!r}...): "
                "a cache made for other documents or fewer of them; cache these documents"
            )
        k, first, parts = found
        part_first, n, windows = parts[offset]
        window = self.manifest["rule"]["teacher_window"]
        records = self._array(k)
        at = first + part_first  # the part's first record
        for w in set((tokens // window).tolist()):
            if (k, at, w) in self.checked:
                continue
            lo, hi = at + w * window, at + min((w + 1) * window, n)
            if zlib.crc32(records[lo:hi].tobytes()) != windows[w]:
                raise CacheError(
                    f"--teacher-cache {self.directory}: {os.path.basename(self.shards[k][0])} "
                    f"records {lo}-{hi} fail their checksum: a damaged shard; rerun the pass"
                )
            self.checked.add((k, at, w))
        rows = np.asarray(records[at + tokens])
        if not np.array_equal(rows["token"], np.asarray(ids)[tokens]):
            raise CacheError(
                f"--teacher-cache {self.directory}: its tokens of a document differ from the "
                "teacher tokenizer's: another tokenizer version; make the cache again"
            )
        if self.topk == 0:
            return {"cache_logits": rows["logits"]}
        if self.manifest["dtype"] == "packed":
            top_ids, logp = unpack(rows["top"])
        else:
            top_ids, logp = rows["ids"].astype(np.int64), rows["logp"].astype(np.float32)
        return {
            "cache_ids": top_ids,
            "cache_logp": logp,
            "cache_rest": rows["rest"],
            "cache_lse": rows["lse"],
        }

    def stack(self, values: list[dict], n: int) -> dict:
        """The reads of a window's parts, in order, as one array per key."""
        if not values:
            if self.topk == 0:
                return {"cache_logits": np.zeros((0, self.vocab), np.float32)}
            k, f = self.topk, np.float32
            return {
                "cache_ids": np.zeros((0, k), np.int64),
                "cache_logp": np.zeros((0, k), f),
                "cache_rest": np.zeros(0, f),
                "cache_lse": np.zeros(0, f),
            }
        return {key: np.concatenate([v[key] for v in values]) for key in values[0]}


def teacher_logits(batch: dict, i: int, vocab: int) -> torch.Tensor:
    """Teacher i's logits [B, n, |V_T|] rebuilt from the cache (METHOD.md 5.7). K = 0: the cached
    logits themselves. K > 0: z = log p + lse (the teacher's own logits, log-sum-exp lse, at its
    top-K ids), and the rest bucket spread evenly over the other |V_T| - K ids,
    z = log(rest / (|V_T| - K)) + lse, its log p at least -1e4 (exp underflows to 0: no -inf)."""
    if f"cache_logits_{i}" in batch:
        return batch[f"cache_logits_{i}"].float()
    logp, lse = batch[f"cache_logp_{i}"].float(), batch[f"cache_lse_{i}"].float().unsqueeze(-1)
    fill = (batch[f"cache_rest_{i}"].float() - math.log(vocab - logp.shape[-1])).clamp_min(-1e4)
    dense = (fill.unsqueeze(-1) + lse).expand(*fill.shape, vocab).clone()
    return dense.scatter_(-1, batch[f"cache_ids_{i}"].long(), logp + lse)


# ----------------------------------------------------------------------------- writing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--teacher", help="hub name, directory, or pkg:NAME with --preset (a random model)")
    a("--data", help="what train.py --data reads (default with --preset: its tiny corpus)")
    a("--out", required=True, help="the cache directory (a rerun resumes it)")
    a("--topk", type=cli.int_flag(0), default=64, help="log-probs kept per token; 0: all, fp32")
    a("--dtype", choices=DTYPES, default="packed", help="how the top-K entries are stored")
    a("--teacher-window", type=cli.int_flag(2), help="teacher tokens per context window "
      "(METHOD.md 4.3; train.py's default: 2048, the tiny preset's 128)")  # fmt: skip
    a("--preset", choices=sorted(PRESETS), help="a random teacher with the real tokenizer")
    a("--seed", type=int, default=1337, help="a preset teacher's weights (train.py's --seed)")
    a("--text-field", default="text", help="the records' text field")
    a("--data-config", help="a hub dataset's configuration")
    a("--split", default="train", help="a hub dataset's split")
    a("--attn-implementation", help="transformers' attention kernel (default: its choice)")
    a("--trust-remote-code", action="store_true", help="run a hub model's own code")
    a("--max-documents", type=cli.int_flag(1), help="the first N documents only")
    a("--batch-tokens", type=cli.int_flag(1), default=4096, help="teacher tokens per forward")
    a("--shard-documents", type=cli.int_flag(1), default=1000, help="documents per shard")
    args = p.parse_args(argv)
    if args.preset:
        args.teacher = args.teacher or PRESETS[args.preset]["teacher"][0]
        args.teacher_window = args.teacher_window or default_window(args.preset)
    if not args.teacher:
        p.error("--teacher is required (or --preset tiny for a random one)")
    if not (args.data or args.preset):
        p.error("--data is required (or --preset tiny for the tiny corpus)")
    args.teacher_window = args.teacher_window or default_window(None)
    return args


def default_window(preset: str | None) -> int:
    """--teacher-window's default, the same in train.py (flags.py)."""
    return PRESETS.get(preset or "", {}).get("teacher_window", 2048)


def rule(tok, window: int) -> dict:
    """The teacher's context rule (METHOD.md 4.3), as a manifest and train.py compare it."""
    return {
        "context": "each document alone, in windows of teacher tokens",
        "teacher_window": window,
        "part_characters": 1 << 20,
        "prefix": [int(x) for x in _own_prefix(tok)],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job = run_dir.Job(args.out)  # torchrun: ranks split the documents
    # ---- checks first (every rank): the data, the teacher, the settings against an existing cache
    job.together(lambda: job.master and args.preset and not args.data and tiny_corpus(args))
    source = args.data or os.path.join(args.out, "tiny_corpus")
    tok, model, manifest = job.together(prepare, args, source, job)
    job.together(start_cache, args.out, manifest, job.master)
    # ---- the pass: this rank's documents, shard by shard (complete shards are skipped)
    job.together(Writer(args, manifest, tok, model, job).run, source)
    job.end()
    return 0


def prepare(args, source: str, job):
    """The teacher's tokenizer and model, and the manifest this pass writes or must match."""
    resolve_files(source)  # a missing path or an unreadable kind: one line now
    tok = load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code)
    model, vocab = load_teacher(args, tok, job.device, job.cuda)
    if args.topk >= vocab:
        raise ValueError(f"--topk {args.topk} >= the teacher's {vocab} ids: give --topk 0")
    if args.topk and args.dtype == "packed" and vocab > 1 << ID_BITS:
        raise ValueError(f"--dtype packed holds ids below {1 << ID_BITS}: use --dtype float16")
    manifest = {
        "format": FORMAT,
        "teacher": args.teacher,
        "tokenizer_hash": tokenizer_hash(tok),
        "weights": weights_identity(args.teacher, args.preset, args.seed),
        "rule": rule(tok, args.teacher_window),
        "data_files": run_dir.data_files(source),
        "topk": args.topk,
        "dtype": args.dtype if args.topk else "float32",
        "vocab": vocab,
        "rows": int(model.rows),
        "data": {"data": args.data, "text_field": args.text_field, "config": args.data_config,
                 "split": args.split, "max_documents": args.max_documents},
        "ranks": job.world_size,
        "shard_documents": args.shard_documents,
    }  # fmt: skip
    return tok, model, manifest


def tiny_corpus(args) -> str:
    """The tiny preset's corpus, as train.py writes it (into the cache directory)."""
    path = os.path.join(args.out, "tiny_corpus")
    if not os.path.exists(path):
        make_tiny_corpus(path, n_docs=400, seed=0)
    return path


def load_teacher(args, tok, device, cuda: bool):
    """The teacher as train.py loads it (eval, bf16 on GPU), its output layer cut to its ids."""
    from train import load_model, trim_output_vocabulary

    ns = argparse.Namespace(
        preset=args.preset,
        seed=args.seed,
        seq_len=args.teacher_window,
        attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code,
    )
    dtype = torch.bfloat16 if cuda else torch.float32
    model = load_model(args.teacher, tok, ns, dtype, device).eval().requires_grad_(False)
    rows = model.get_output_embeddings().weight.shape[0]
    vocab = min(len(tok), rows)
    trim_output_vocabulary(model, vocab)
    model.rows = rows  # before the trim: what train.py's KL pads a cached teacher back to
    return model, vocab


def start_cache(out: str, manifest: dict, master: bool) -> None:
    """A new cache gets the manifest; an existing one must have been made with these settings
    (then the pass resumes it)."""
    path = os.path.join(out, "manifest.json")
    if os.path.exists(path):
        with open(path, "rb") as f:
            was = json.load(f)
        for key, value in manifest.items():
            if was.get(key) != value:
                raise ValueError(
                    f"--out {out} holds a cache made with {key} {was.get(key)!r}, not "
                    f"{value!r}: choose another --out, or delete that cache to make this one"
                )
        return
    if master:
        cli.check_output_dir(out, "--out")
        cli.atomic_write(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


class Writer:
    """One rank's pass: its documents, in order, in shards of --shard-documents."""

    def __init__(self, args, manifest: dict, tok, model, job):
        self.args, self.manifest, self.tok, self.model, self.job = args, manifest, tok, model, job
        self.prefix = [int(x) for x in _own_prefix(tok)]
        self.dtype = record_dtype(args.topk, manifest["dtype"], manifest["vocab"])
        self.tokens = self.bytes = self.documents = self.forwarded = 0

    def run(self, source: str) -> None:
        args, job = self.args, self.job
        src = DocumentSource(
            source, resolve_files(source), args.text_field, args.data_config, args.split,
            False, 0, 0,
        )  # fmt: skip
        shard, batch, skipped = 0, [], 0
        self.started = time.perf_counter()
        for g, (_, text) in enumerate(documents(src, 0, 0, 1, Counter())):  # in file order
            if args.max_documents and g >= args.max_documents:
                break
            if g % job.world_size != job.rank:
                continue
            if not isinstance(text, str):  # a conversation: chat data is read online
                skipped += 1
                continue
            batch.append(text)
            if len(batch) == args.shard_documents:
                self.shard(shard, batch)
                shard, batch = shard + 1, []
        if batch:
            self.shard(shard, batch)
        if skipped:
            print(f"warning: {skipped} conversations skipped: a cache holds documents (chat data "
                  "is read online)", file=sys.stderr)  # fmt: skip
        if job.master:
            rate = self.forwarded / max(time.perf_counter() - self.started, 1e-9)
            print(file=sys.stderr)  # after the progress line
            print(
                f"cached {self.tokens:,} teacher tokens ({rate:,.0f}/s) into "
                f"{self.args.out}: {self.bytes / 2**20:,.1f} MiB, "
                f"{self.dtype.itemsize} bytes per token (this rank)"
            )

    def shard(self, n: int, texts: list[str]) -> None:
        """Shard n of this rank: skipped when complete (a resumed pass), else computed and written:
        records first, the index last (both atomically)."""
        stem = os.path.join(self.args.out, f"shard-{self.job.rank:05d}-{n:06d}")
        if os.path.exists(stem + ".json"):
            return
        docs, records, rows, at = [], [], [], 0  # at: the shard's records so far
        for text in texts:
            first, parts = at, []
            for offset, part in _parts(text):
                part_records, part_rows = self.part(part, text, offset)
                parts.append([offset, at - first, len(part_records), part_rows])
                records.append(part_records)  # one per part, in the order of `parts`
                rows += [(part_records, a, b) for a, b in part_rows]
                at += len(part_records)
            docs.append([document_key(text), first, parts])
        batch = []  # the teacher windows of the whole shard, --batch-tokens at a time
        for row in rows:
            batch.append(row)
            if sum(len(self.prefix) + b - a for _, a, b in batch) >= self.args.batch_tokens:
                self.forward(batch)
                batch = []
        if batch:
            self.forward(batch)
        parts = (part for doc in docs for part in doc[2])
        for part, part_records in zip(parts, records):  # each teacher window's checksum
            part[3] = [zlib.crc32(part_records[a:b].tobytes()) for a, b in part[3]]
        array = np.concatenate(records) if records else np.zeros(0, self.dtype)
        header = self.write_records(stem + ".npy", array)
        index = {"records": len(array), "header": header, "documents": docs}
        cli.atomic_write(stem + ".json", lambda f: f.write(json.dumps(index).encode()))
        self.bytes += array.nbytes
        self.progress(len(texts))

    def progress(self, documents: int = 0) -> None:
        """The progress line (after each forward): documents done, teacher tokens through the
        teacher and their rate, bytes written."""
        self.documents += documents
        if self.job.master:
            rate = self.forwarded / max(time.perf_counter() - self.started, 1e-9)
            print(
                f"\r{self.documents:,} documents, {self.forwarded:,} teacher tokens ({rate:,.0f}/s "
                f"on this rank), {self.bytes / 2**20:,.1f} MiB written",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def write_records(self, path: str, array: np.ndarray) -> int:
        """The records as a .npy file (atomically); the header's size."""
        header = []

        def write(f) -> None:
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
            header.append(f.tell())
            f.write(array.tobytes())

        cli.atomic_write(path, write)
        return header[0]

    def part(self, part: str, document: str, offset: int):
        """The records of one document part's teacher tokens (ids and byte offsets filled in),
        and its teacher windows [a, b) (METHOD.md 4.3)."""
        spans = _body(token_spans(self.tok, part))
        n, window = len(spans.ids), self.args.teacher_window
        base = len(document[:offset].encode("utf-8", "surrogatepass"))
        records = np.zeros(n, self.dtype)
        records["token"] = spans.ids
        records["start"] = base + spans.start
        if "rest" in self.dtype.names:
            records["rest"] = np.nan  # a token no position predicts (a window's first, no prefix)
        self.tokens += n
        return records, [(w * window, min((w + 1) * window, n)) for w in range(-(-n // window))]

    def distributions(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """What a record keeps of the logits [n, |V_T|] of n positions (METHOD.md 5.7)."""
        k = self.args.topk
        if k == 0:
            return {"logits": logits.cpu().numpy()}
        # top-K log p, lse, and the rest's log-mass, summed over the other ids (no cancellation);
        # in place: one exp over the vocabulary
        top, top_ids = logits.topk(k, dim=-1)
        e = logits.sub_(top[:, :1]).exp_()  # exp(z - max z)
        total = e.sum(-1)
        lse = top[:, 0] + total.log()
        rest = e.scatter_(-1, top_ids, 0.0).sum(-1).log() - total.log()
        top = (top - lse.unsqueeze(-1)).cpu().numpy()
        values = {"lse": lse.cpu().numpy(), "rest": rest.cpu().numpy()}
        if self.manifest["dtype"] == "packed":
            return values | {"top": pack(top_ids.cpu().numpy(), top)}
        return values | {"ids": top_ids.cpu().numpy(), "logp": top}

    @torch.no_grad()
    def forward(self, rows: list[tuple[np.ndarray, int, int]]) -> None:
        """One forward over teacher windows (records, a, b) packed into one sequence (positions
        restart at each: a window attends only to itself, as train.py's online teacher); each
        position's distribution goes into the record of the token it predicts."""
        prefix, device = self.prefix, self.job.device
        seq = np.concatenate([np.concatenate([prefix, r["token"][a:b]]) for r, a, b in rows])
        pos = np.concatenate([np.arange(len(prefix) + b - a) for _, a, b in rows])
        autocast = torch.autocast("cuda", torch.bfloat16) if self.job.cuda else nullcontext()
        with autocast:
            logits = self.model(
                input_ids=torch.as_tensor(seq.astype(np.int64), device=device)[None],
                position_ids=torch.as_tensor(pos, device=device)[None],
                use_cache=False,
            ).logits[0]
        first = 0 if prefix else 1  # position (prefix + j - 1) of a row predicts its token a + j
        at, where = 0, []
        for _, a, b in rows:
            where.append(at + len(prefix) + first - 1 + np.arange(b - a - first))
            at += len(prefix) + b - a
        where = torch.as_tensor(np.concatenate(where), device=device)
        values = [self.distributions(logits[where[i : i + 1024]].float()) for i in
                  range(0, len(where), 1024)]  # fmt: skip
        values = {key: np.concatenate([v[key] for v in values]) for key in values[0]}
        at = 0
        for records, a, b in rows:
            n = b - a - first
            for key, value in values.items():
                records[key][a + first : b] = value[at : at + n]
            at += n
        self.forwarded += len(seq)
        self.progress()


if __name__ == "__main__":
    sys.exit(cli.one_line_errors(main))
