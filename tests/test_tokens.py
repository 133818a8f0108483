"""tokens.py: loading every tokenizer format offline, and the canonical bytes of tokens."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from tokenizers import Tokenizer, pre_tokenizers

from conftest import get_tokenizer
from tokens import (
    PACKAGED,
    byte_level_alphabet,
    encode_bytes,
    end_of_document_id,
    load_tokenizer,
    packaged_tokenizer,
    special_roles,
    token_bytes,
    tokenizer_hash,
)

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
# A directory's tokenizer_config.json as the model repos ship it (Llama-3.2-Instruct declares its
# end of TURN as eos; Qwen3's class makes transformers rebuild the pipeline around the vocabulary)
DIRECTORY_CONFIGS = {
    "llama-3.2": {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
    },
    "qwen3": {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
    },
}


def test_every_packaged_tokenizer_loads_with_its_real_size():
    sizes = {name: len(get_tokenizer(name)) for name in PACKAGED}
    # Llama-3.2 here is the 128,256-id tokenizer plus <|image|>; Qwen3 151,669 ids
    assert sizes["llama-3.2"] == 128_257
    assert sizes["qwen3"] == 151_669
    assert sizes["o200k"] == 200_019  # o200k_base ranks + <|endoftext|> + <|endofprompt|>
    assert sizes["mistral-v1"] == 32_000
    assert sizes["mistral-v3"] == 32_768


def test_special_token_conventions(llama, qwen):
    assert llama("hi").input_ids[0] == llama.bos_token_id == 128000  # Llama adds BOS
    assert qwen("hi").input_ids == qwen.encode("hi", add_special_tokens=False)  # Qwen adds none
    assert qwen.bos_token_id is None


def test_a_directory_and_its_tokenizer_json_load_the_same(tmp_path):
    path = packaged_tokenizer("qwen3")
    from_file = load_tokenizer(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path.replace("tokenizer.json", name), tmp_path / name)
    from_dir = load_tokenizer(str(tmp_path))
    assert tokenizer_hash(from_file) == tokenizer_hash(from_dir)
    assert from_dir.eos_token == "<|im_end|>"


@pytest.mark.parametrize("name", sorted(DIRECTORY_CONFIGS))
def test_a_directory_keeps_its_chat_template_and_hashes_as_its_tokenizer_json(name, tmp_path):
    bare = get_tokenizer(name)  # the packaged tokenizer.json, loaded as a file
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    shutil.copy(packaged_tokenizer(name), directory / "tokenizer.json")
    config = {**DIRECTORY_CONFIGS[name], "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(directory))
    assert tok.chat_template == TEMPLATE != bare.chat_template  # pkg:qwen3: its own, shipped
    assert tokenizer_hash(tok) == tokenizer_hash(bare)
    assert token_bytes(tok) == token_bytes(bare)
    assert end_of_document_id(tok) == end_of_document_id(bare) is not None
    assert tok.eos_token == config["eos_token"] and tok.bos_token == config["bos_token"]
    text = "The 201 cats\tsat — 猫が好き 😀 <s>"
    assert tok(text).input_ids == bare(text).input_ids
    assert tok.decode(tok(text).input_ids) == bare.decode(bare(text).input_ids)
    saved = tmp_path / "student"  # what a student checkpoint's tokenizer writes
    tok.save_pretrained(str(saved))
    assert any(TEMPLATE in f.read_text() for f in saved.iterdir() if f.is_file())
    again = load_tokenizer(str(saved))
    assert again.chat_template == TEMPLATE and token_bytes(again) == token_bytes(bare)


def test_a_directory_without_a_config_guesses_roles_among_added_tokens(tmp_path, llama, qwen):
    for name, bare in (("llama-3.2", llama), ("qwen3", qwen)):
        directory = tmp_path / name
        directory.mkdir()
        shutil.copy(packaged_tokenizer(name), directory / "tokenizer.json")
        tok = load_tokenizer(str(directory))
        assert tokenizer_hash(tok) == tokenizer_hash(bare)
        assert end_of_document_id(tok) == end_of_document_id(bare)
    assert special_roles(load_tokenizer(str(tmp_path / "llama-3.2"))) == special_roles(llama)
    # Qwen3's "<s>" and "<unk>" are ordinary text, never roles
    assert special_roles(load_tokenizer(str(tmp_path / "qwen3"))) == {"eos": 151643}


def test_the_hash_of_a_tokenizer_json_is_what_it_was_however_it_is_loaded(tmp_path):
    """W files are bound to this hash: the sha256 of the tokenizers library's own serialization of
    the tokenizer.json (as this repo has always computed it), for the bare file and for a
    directory holding it, whatever transformers rebuilds when it loads the directory."""
    for name in ("llama-3.2", "qwen3"):
        path = packaged_tokenizer(name)
        expected = hashlib.sha256(Tokenizer.from_file(path).to_str().encode()).hexdigest()
        directory = tmp_path / name
        directory.mkdir()
        shutil.copy(path, directory / "tokenizer.json")
        (directory / "tokenizer_config.json").write_text(json.dumps(DIRECTORY_CONFIGS[name]))
        assert tokenizer_hash(load_tokenizer(path)) == expected
        assert tokenizer_hash(load_tokenizer(str(directory))) == expected


def test_a_directory_with_a_broken_tokenizer_json_is_a_one_line_error(tmp_path):
    for text in ("{not json", '{"hello": 1}', '{"added_tokens": [], "model": {"type": "BPE"}}'):
        (tmp_path / "tokenizer.json").write_text(text)
        with pytest.raises(ValueError, match="cannot load tokenizer") as error:
            load_tokenizer(str(tmp_path))
        assert "\n" not in str(error.value)


def test_hash_is_stable_and_tells_tokenizers_apart(llama, qwen):
    again = load_tokenizer("pkg:llama-3.2")
    assert tokenizer_hash(again) == tokenizer_hash(llama) != tokenizer_hash(qwen)


def test_byte_level_alphabet_covers_all_256_bytes_once():
    table = byte_level_alphabet()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n") and table["A"] == ord("A")


def test_byte_level_alphabet_is_the_gpt2_table():
    # GPT-2's encoder.py: printable bytes stand for themselves, the other 68 become 256 + n
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    gpt2 = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    assert byte_level_alphabet() == gpt2 and len(gpt2) == 256
    assert set(gpt2) == set(pre_tokenizers.ByteLevel.alphabet())  # the Rust library's alphabet


def test_token_bytes_concatenate_to_the_text(llama, qwen, o200k, mistral):
    text = "The 201 cats\tsat  on\r\nthe mat — 猫が好き 😀 naïve café"
    for tok in (llama, qwen, o200k):
        table = token_bytes(tok)
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids) == text.encode()
    table = token_bytes(mistral)  # SentencePiece adds its prefix space "▁" at the start
    ids = mistral.encode(text, add_special_tokens=False)
    assert b"".join(table[i] for i in ids) == b" " + text.encode()


def test_special_tokens_have_no_bytes(llama, qwen):
    assert token_bytes(llama)[llama.bos_token_id] is None
    assert token_bytes(qwen)[qwen.convert_tokens_to_ids("<|im_start|>")] is None


def test_encode_bytes_adds_no_prefix_space_and_handles_fragments(qwen, mistral):
    q_bytes, m_bytes = token_bytes(qwen), token_bytes(mistral)
    cjk = "中".encode()  # 3 bytes: split it inside the character
    for tok, table in ((qwen, q_bytes), (mistral, m_bytes)):
        for piece in (b"hello", b" world", cjk[:2], cjk[2:], b"\xf0\x9f"):
            ids = encode_bytes(tok, [piece])[0]
            assert b"".join(table[i] for i in ids) == piece, (tok.name_or_path, piece)


def test_encode_bytes_reads_special_token_strings_as_text(llama, qwen, o200k, mistral):
    # a token's bytes are text: Qwen3's ORDINARY tokens "<s>", "</s>", "<unk>" spell Mistral's BOS,
    # EOS and unk strings, and W must map them to Mistral's text pieces, never to those tokens
    assert token_bytes(qwen)[qwen.convert_tokens_to_ids("<s>")] == b"<s>"
    toks = (llama, qwen, o200k, mistral)
    added = [tok.backend_tokenizer.get_added_tokens_decoder() for tok in toks]
    strings = sorted({t.content for decoder in added for t in decoder.values()})
    pieces = [s.encode() for s in strings] + [b"x<s>y", b"<|eot_id|><think>", b"<s>\xf0\x9f"]
    for tok, decoder in zip(toks, added):
        table = token_bytes(tok)
        for piece, ids in zip(pieces, encode_bytes(tok, pieces)):
            assert not set(ids) & decoder.keys(), (tok.name_or_path, piece)
            assert b"".join(table[i] for i in ids) == piece, (tok.name_or_path, piece)


def test_unknown_packaged_name_and_non_tokenizer_file_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown packaged tokenizer"):
        load_tokenizer("pkg:gpt-17")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        load_tokenizer(str(text))
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(str(bogus))


def test_unreachable_hub_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer("no-such-org/no-such-model")
