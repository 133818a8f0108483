"""Chat data: each side reads a conversation in its own chat template, and only the assistant's
answers are distilled (METHOD.md 4.2). An option beside data.py: data.py's record_text tells a
chat record (`messages`, or TRL's `prompt` and `completion`) as a `data.Conversation`, and
AlignedWindows asks this module for its pieces (`AlignedWindows.chat`, a Chat that `setup` makes;
`messages` reads and checks the record); train.py calls `setup` and `prepare_run`.

Rendering. Each side's template (the student's, each teacher's: its tokenizer's `chat_template` or a
--student-chat-template / --teacher-chat-template file) renders the conversation with every
message's content replaced by a sentinel, a private-use character numbered by the message. The
sentinels cut the rendering into the template's own text around the contents, which is tokenized
with special-token parsing (role headers, separators: template tokens); each content is tokenized
as text (a `<|im_end|>` written in a message stays text), the same bytes on every side, and aligned
by bytes as documents are. The verbatim content goes in: a template's own edits of a content
(Llama-3's trim, Qwen3's moving a `<think>` block out of an earlier answer) are not applied, so that
both sides read the same bytes. The rendering depends only on the roles (no content enters the
template), so it is cached per side by the tuple of roles: a corpus of Q&A pairs renders once.

Pieces. Per message: its head (the template tokens before its content), its content, its end (the
template tokens after the content up to and including the first special token: `<|eot_id|>`,
`<|im_end|>`, `<|end|>`); the last end also holds what the template writes after the last message.
A trained message (an assistant's; every message's with assistant_only=False) has its content's
tokens and its end of turn as the student's CE targets, its content aligned into chunks and its two
ends of turn paired as one chunk; every other token is context only (no target, no chunk).

Cutting. Conversations are packed into windows as documents are, with no end-of-document token
after them (the template says where a conversation ends). A window ends before a message's head,
or inside a content at a clean student cut (as a document is cut); never inside template tokens,
never between a head and its content's first piece, nor between a content's last piece and its end
of turn. A conversation's position (for a resume) is a student token offset in its full rendering.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from align import TokenSpans, token_spans
from data import (
    CHAT_FIELDS,
    Conversation,
    _body,
    _count,
    _Part,
    _Segment,
    _Window,
    documents,
    record_text,
)
from tokens import token_bytes

SENTINEL = 0xF0000  # message k's content renders as chr(SENTINEL + k) (Supplementary PUA-A)
MAX_MESSAGES = 0xFFFE
PROBE = ("user", "assistant")  # what every template must render (setup)


class ChatIssue(ValueError):
    """A conversation that a side's template cannot render as pieces: counted as chat_template."""


@dataclass
class Side:
    """One side's tokenizer and chat template, and its renderings by tuple of roles."""

    tok: object
    template: str
    name: str  # "the student (pkg:llama-3.2)", for messages
    flag: str  # the flag that gives this side's template
    prefix: list[int]  # its own leading special tokens: a window holds them once
    added: np.ndarray = field(init=False)  # per id: an added (special) token, no bytes
    layouts: dict = field(default_factory=dict)

    def __post_init__(self):
        self.added = np.array([b is None for b in token_bytes(self.tok)], dtype=bool)

    def layout(self, roles: tuple[str, ...]):
        """(heads, ends, n_end) of a conversation with these roles, as token id lists: message k
        is heads[k], its content, ends[k]; the first n_end[k] tokens of ends[k] are its end of
        turn. ChatIssue when the template fails (the failure is cached too)."""
        found = self.layouts.get(roles)
        if found is None:
            try:
                found = self._layout(roles)
            except ChatIssue as e:
                found = e
            if len(self.layouts) > 4096:  # bounded: roles are few in practice
                self.layouts.clear()
            self.layouts[roles] = found
        if isinstance(found, ChatIssue):
            raise found
        return found

    def _layout(self, roles: tuple[str, ...]):
        messages = [{"role": r, "content": chr(SENTINEL + k)} for k, r in enumerate(roles)]
        try:
            text = self.tok.apply_chat_template(
                messages, chat_template=self.template, tokenize=False
            )
        except Exception as e:  # jinja's TemplateError (raise_exception) or the template's own
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise ChatIssue(f"{self.name}'s chat template fails on roles {roles}: {why}") from None
        marks = [chr(SENTINEL + k) for k in range(len(roles))]
        at = [text.find(m) for m in marks]
        if any(text.count(m) != 1 for m in marks) or at != sorted(at):
            raise ChatIssue(
                f"{self.name}'s chat template drops, repeats or reorders a message's content "
                f"(roles {roles})"
            )
        starts = [0, *(a + 1 for a in at)]  # a sentinel is one character
        pieces = [text[a:b] for a, b in zip(starts, [*at, len(text)])]
        ids = [self.tok.backend_tokenizer.encode(p, add_special_tokens=False).ids for p in pieces]
        heads, ends, n_end = [ids[0]], [], []
        for k, piece in enumerate(ids[1:], 1):
            special = np.flatnonzero(self.added[piece]) if piece else []
            n = int(special[0]) + 1 if len(special) else 0  # through the first special token
            n_end.append(n)
            if k < len(roles):  # the rest is the next message's head
                ends.append(piece[:n])
                heads.append(piece[n:])
            else:  # after the last message: all of it, its end of turn first
                ends.append(piece)
        return heads, ends, n_end


@dataclass(frozen=True)
class Template:
    """Template tokens of one piece of a conversation on every side (0: the student, i + 1:
    teacher i) and their chunk ids: 0 on a trained end of turn (the student's and each teacher's
    ends of turn are one chunk: paired), -1 elsewhere."""

    ids: tuple[np.ndarray, ...]
    chunks: tuple[np.ndarray, ...]

    def side(self, i: int):
        """(student chunk ids, teacher i's ids, its chunk ids) before the predictor shift."""
        return self.chunks[0], self.ids[i + 1], self.chunks[i + 1]


@dataclass
class _Shape:
    """The template segments of a conversation with given roles: per message its head and its end
    (the last: with what follows the last message); the first head also without the tokens a
    window's prefix holds."""

    heads: list[_Segment]
    first_head: _Segment  # at a window's start
    ends: list[_Segment]
    trained: list[bool]


class Chat:
    """What AlignedWindows asks for a conversation's pieces (`segments`); see the docstring."""

    def __init__(self, windows, sides: list[Side], assistant_only: bool):
        self.windows = windows  # data.AlignedWindows: its student tokenizer
        self.sides = sides  # student, then each teacher (a same-tokenizer one: the student's)
        self.assistant_only = assistant_only
        self.shapes: dict = {}  # by tuple of roles: a _Shape, or the ChatIssue it raised
        self.end_of_turn = []  # per side: the special token that ends an assistant's turn
        for side in sides:
            ends, n_end = side.layout(PROBE)[1:]
            self.end_of_turn.append(ends[1][n_end[1] - 1] if n_end[1] else None)

    def segments(self, conv: Conversation, skip_to: int, issues: Counter, window: _Window):
        """The pieces of one conversation for `window` from student token `skip_to` of its full
        rendering: (segment, position after it), or (None, position) when the window must close
        first, as data.AlignedWindows._pack takes them (see the module docstring, Cutting)."""
        found = self._read(conv, issues)
        if found is None:
            return
        contents, shape = found
        pos = 0
        for k, (content, spans) in enumerate(contents):
            head, end, n = shape.heads[k], shape.ends[k], len(spans.ids) if spans else 0
            e, body = len(end.student.ids), pos + len(head.student.ids)  # body: the content's
            part = None  # the content's cuts, found only when it must be cut
            if skip_to <= pos:  # its head, with room for the content's first piece after it
                room = window.room - len(head.student.ids)
                if window.segments and n + e > room:
                    part = _Part(content, spans) if n and room > 0 else None
                    if part is None or part.fit(0, room, e) <= 0:
                        yield None, pos
                yield shape.first_head if k == 0 and not window.segments else head, body
            i = max(skip_to - body, 0)
            while i < n:  # the content, cut as a document is (data.AlignedWindows._segments)
                if i == 0 and n + e <= window.room:  # all of it, with its end
                    seg, j = _Segment(spans, content, False), n
                else:
                    part = part or _Part(content, spans)
                    j = part.fit(i, window.room, e)  # its end of turn kept with its last piece
                    seg = part.segment(i, j, False)[0] if j > i else None
                if seg is not None:
                    yield replace(seg, target=np.full(j - i, shape.trained[k])), body + j
                    i = j
                elif window.segments:
                    yield None, body + i
                else:
                    _count(issues, "unsplittable_text", f"no clean cut in {window.room} tokens")
                    i = part.next_cut(i + window.room)
            pos = body + n + e
            if skip_to < pos:
                yield end, pos

    def _read(self, conv: Conversation, issues: Counter):
        """(per message (content, the student's tokens of it or None when empty), its _Shape), or
        None (counted) when a template cannot render it or it trains nothing."""
        pairs = messages(conv, issues)
        if pairs is None:
            return None
        roles = tuple(r for r, _ in pairs)
        trained = [not self.assistant_only or r == "assistant" for r in roles]
        if not any(t and c for t, (_, c) in zip(trained, pairs)):
            _count(issues, "no_assistant_content", "a conversation with nothing to train on")
            return None
        shape = self.shapes.get(roles)
        if shape is None:
            try:
                shape = self._shape(roles, trained)
            except ChatIssue as e:
                shape = e
            if len(self.shapes) > 4096:  # bounded: roles are few in practice
                self.shapes.clear()
            self.shapes[roles] = shape
        if isinstance(shape, ChatIssue):
            _count(issues, "chat_template", str(shape))
            return None
        tok = self.windows.student_tok
        return [(c, _body(token_spans(tok, c)) if c else None) for _, c in pairs], shape

    def _shape(self, roles: tuple[str, ...], trained: list[bool]) -> _Shape:
        """Every side's template segments for these roles (ChatIssue when a template fails)."""
        if len(roles) > MAX_MESSAGES:
            raise ChatIssue(f"{len(roles)} messages, more than {MAX_MESSAGES}")
        layouts = [side.layout(roles) for side in self.sides]
        if any(t and not n for t, n in zip(trained, layouts[0][2])):
            raise ChatIssue(f"{self.sides[0].name}: no special token ends a turn")
        heads = [self._template([x[0][k] for x in layouts]) for k in range(len(roles))]
        last = len(roles) - 1
        ends = [
            self._template([x[1][k] for x in layouts], [x[2][k] * t for x in layouts], k == last)
            for k, t in enumerate(trained)
        ]
        lead = [
            len(side.prefix) if x[0][0][: len(side.prefix)] == side.prefix else 0
            for side, x in zip(self.sides, layouts)
        ]
        first = self._template([x[0][0][n:] for x, n in zip(layouts, lead)])
        return _Shape(heads, first, ends, trained)

    def _template(self, ids: list, n_end: list | None = None, last: bool = False) -> _Segment:
        """Template tokens (per side) as a window's segment; the first n_end[k] tokens of side k
        are a trained end of turn (a CE target on the student's side, one chunk)."""
        ids = [np.asarray(x, dtype=np.int64) for x in ids]
        n_end = n_end or [0] * len(ids)
        chunks = tuple(np.where(np.arange(len(x)) < n, 0, -1) for x, n in zip(ids, n_end))
        n = len(ids[0])
        student = TokenSpans(
            ids[0], np.zeros(n, bool), np.full(n, -1), np.zeros(n, bool), np.zeros(1, np.int64), 0
        )
        template = Template(tuple(ids), chunks)
        return _Segment(student, "", last, target=chunks[0] >= 0, template=template)


def messages(conv: Conversation, issues: Counter) -> list[tuple[str, str]] | None:
    """A chat record's (role, content) pairs: its messages (the text field's, or `messages`), or
    TRL's prompt (the user's turn: a text or messages) and completion (the assistant's); other keys
    of a message are not read. None (counted) when a message lacks a role or a text content."""
    record = conv.record
    found = record.get(conv.text_field)
    if not isinstance(found, list):
        found = record.get("messages")
    if found is None:
        found = _turns(record.get("prompt"), "user") + _turns(record.get("completion"), "assistant")
    ok = isinstance(found, list) and all(isinstance(m, dict) for m in found)
    pairs = [(m.get("role"), m.get("content")) for m in found] if ok else []
    if not pairs or not all(isinstance(r, str) and r and isinstance(c, str) for r, c in pairs):
        _count(issues, "bad_conversation", f"{conv.where}: messages, each a role and a text")
        return None
    try:
        "".join(c for _, c in pairs).encode()
    except UnicodeEncodeError:  # lone surrogates, from JSON escapes such as "\ud800"
        _count(issues, "invalid_utf8", conv.where)
        pairs = [(r, c.encode(errors="surrogatepass").decode(errors="replace")) for r, c in pairs]
    return pairs


def _turns(value, role: str) -> list:
    """A prompt or completion as messages: a text is one message of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value if isinstance(value, list) else [None]


# ----------------------------------------------------------------------------- setting up


def setup(windows, student_template=None, teacher_templates=None, assistant_only=True):
    """A Chat for `windows` (data.AlignedWindows) when its data holds conversations (a local
    file's first record, or a hub dataset's first document, is one), else None. Each side's
    template: the file given (teacher_templates in teacher order: none, one for all, or one each;
    "" keeps that teacher's own), else its tokenizer's chat_template. A template that is missing
    or fails on a user/assistant exchange, or a student template that ends an assistant's turn
    with no special token: ValueError, one line."""
    where = first_conversation(windows.source)
    if where is None:
        return None
    n = len(windows.teacher_toks)
    files = list(teacher_templates or [])
    if len(files) not in (0, 1, n):
        raise ValueError(
            f"{len(files)} --teacher-chat-template for {n} teacher(s): give one per teacher, in "
            "--teacher order, or one for all"
        )
    files = files * n if len(files) == 1 else files or [None] * n
    student = _side(windows.student_tok, student_template, "the student", "--student-chat-template")
    student.prefix = list(windows.prefix[0])
    sides = [student]
    for i, tok in enumerate(windows.teacher_toks):
        if windows.same[i]:  # it reads the student's ids (KL compares positions): its template
            if files[i] and _side(tok, files[i], "", "--teacher-chat-template").template != (
                student.template
            ):
                raise ValueError(
                    f"--teacher-chat-template {files[i]}: teacher {i + 1} has the student's "
                    "tokenizer and reads the student's ids, in the student's template: give it ''"
                )
            sides.append(student)
            continue
        side = _side(tok, files[i] or None, f"teacher {i + 1}", "--teacher-chat-template")
        side.prefix = list(windows.prefix[i + 1])
        sides.append(side)
    for side in sides:
        if side.template is None:
            raise ValueError(
                f"--data: {where} holds conversations and {side.name} has no chat template in "
                f"its tokenizer: give {side.flag} FILE.jinja"
                + " (one per teacher, in --teacher order)"
                * (side is not student)
            )
        try:
            side.layout(PROBE)
        except ChatIssue as e:
            raise ValueError(f"{side.flag}: {e}") from None
    chat = Chat(windows, sides, assistant_only)
    if chat.end_of_turn[0] is None:
        raise ValueError(
            f"{student.flag}: the student's template ends an assistant's turn with no special "
            "token, so the student could not learn to stop: give a template that does"
        )
    return chat


def _side(tok, path: str | None, name: str, flag: str) -> Side:
    """A side with its template: the file at `path`, else the tokenizer's (None: it has none)."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{flag} {path}: {getattr(e, 'strerror', None) or e}") from None
        if not template.strip():
            raise ValueError(f"{flag} {path} is empty")
    else:
        template = tok.chat_template
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
    name = f"{name} ({tok.name_or_path})"
    return Side(tok, template, name, f"{flag} {path}" if path else flag, [])


def first_conversation(source) -> str | None:
    """The first local file whose first record is a conversation (a parquet file: by its
    columns), or the hub dataset whose first document is one; None when there is none."""
    if source.files is None:
        first = next(documents(replace(source, shuffle=False), 0, 0, 1, Counter()), None)
        return source.data if first and isinstance(first[1], Conversation) else None
    for path in source.files:
        if _is_chat_file(path, source.text_field):
            return path
    return None


def _is_chat_file(path: str, text_field: str) -> bool:
    try:
        if path.endswith(".parquet"):
            names = set(pq.read_schema(path).names)
            return text_field not in names and bool(names & set(CHAT_FIELDS))
        if path.endswith(".txt"):
            return False
        with open(path, "rb") as f:
            if f.read(1 << 16).lstrip().startswith(b"["):  # a .json array of records
                f.seek(0)
                records = json.load(f)
                return bool(records) and _is_chat_record(records[0], text_field)
            f.seek(0)
            for line in f:
                if line.strip():
                    return _is_chat_record(json.loads(line), text_field)
    except (OSError, ValueError, pa.ArrowException):  # data.py counts it when it reads it
        return False
    return False


def _is_chat_record(record, text_field: str) -> bool:
    return isinstance(record_text(record, text_field, Counter(), ""), Conversation)


def prepare_run(teachers, chat: Chat | None) -> None:
    """What a train.py run on chat data changes: the student's tokenizer keeps its template (its
    checkpoints are read with evaluate.py --apply-chat-template), and each teacher's W pairs the
    student's end of turn with the teacher's (an exact entry, as W pairs ends of documents; GOLD's
    and H-KL's common sets too), so that the end-of-turn chunk has a KD target (METHOD.md 4.2).
    Only where both are unpaired."""
    if chat is None:
        return
    chat.windows.student_tok.chat_template = chat.sides[0].template
    s = chat.end_of_turn[0]
    for i, t in enumerate(teachers):
        tt = chat.end_of_turn[i + 1]
        if tt is None or (t.W is None and t.pairs is None):
            continue
        if t.pairs is not None and not ((t.pairs[:, 0] == s).any() or (t.pairs[:, 1] == tt).any()):
            t.pairs = torch.cat([t.pairs, t.pairs.new_tensor([[s, tt]])])
        if isinstance(t.W, torch.nn.Module):  # a LearnableProjection: one fixed slot
            if not bool(t.W.mask[s].any()) and not bool((t.W.index[t.W.mask] == tt).any()):
                with torch.no_grad():
                    t.W.index[s, 0], t.W.mask[s, 0], t.W.logits[s, 0] = tt, True, 0.0
        elif t.W is not None:
            W = t.W.coalesce()
            rows, cols = W.indices()
            if not bool((rows == s).any()) and not bool((cols == tt).any()):
                entry = torch.tensor([[s], [tt]], device=W.device)
                indices = torch.cat([W.indices(), entry], 1)
                values = torch.cat([W.values(), W.values().new_ones(1)])
                W = torch.sparse_coo_tensor(indices, values, W.shape, check_invariants=True)
                t.W = W.coalesce()
