"""Conversation data for supervised fine-tuning (SFT): records read and checked, encoded with a
loss mask on the answers, and a built-in corpus of them drawn from the Python standard library.

    read_conversations(paths)        JSONL {"messages": [{"role", "content"}, ...]} records ->
                                     (conversations, counts); bad records skipped and counted
                                     by reason (REASONS), or refused with strict=True
    iter_records(path)               one file's records with their line numbers, one by one
    check_chat_tokenizer(tokenizer)  DataError unless each marker the chat format writes is one id
    encode_conversation(messages, tokenizer)      -> (ids int32 [T], loss_mask bool [T])
    encode_conversations(conversations, tokenizer, max_tokens)
                                     -> ([(ids, loss_mask), ...], counts); too long: skipped
    target_mask(loss_mask)           -> bool [T - 1], the weights of the next-token loss
    function_conversations(source)   a Python source's documented functions as conversations
    builtin_conversations(split, limit)  those of the standard library, split as pre-training's
                                     built-in corpus is

Encoding. A conversation is rendered by dsv3_jax.chat.template.render_with_assistant_spans (BOS
written first), and the text is tokenized piece by piece: the text before the first span, each
span, the text between spans, the text after the last, each encoded alone and the ids
concatenated. So no token straddles a span boundary, and loss_mask is True exactly on the tokens
of the spans: each assistant answer (its reasoning dropped, as the format drops it) and the EOS
that ends it; never the system or user text, nor the ASSISTANT marker that opens the answer. For
the tokenizers trained here and DeepSeek's tokenizer.json the chat markers cut the text anyway
(each is one id, matched wherever it stands), so the pieces' ids equal the whole text's. (A
sentencepiece model with a dummy prefix, not trained here, would put a space before each piece.)

The next-token loss: the logits at position t predict ids[t + 1], so the loss at t counts where
loss_mask[t + 1] is True: target_mask(loss_mask) = loss_mask[1:], aligned with logits[:-1] and
targets ids[1:]. The position of the ASSISTANT marker thus learns the answer's first token, and
the EOS position (what comes after an answer) learns nothing. loss_mask[0] is BOS, always False.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from dsv3_jax.chat.template import (SPECIAL_TOKENS, MessageError, answer_of, check_messages,
                                    render_with_assistant_spans)
from dsv3_jax.data.corpus import BUILTIN, SPLITS, Corpus, DataError, builtin_files
from dsv3_jax.data.special_tokens import CHAT_SPECIAL_TOKENS, THINK_BEGIN, THINK_END
from dsv3_jax.data.tokenizer import Tokenizer

Conversation = list[dict[str, str]]  # [{"role": "system" | "user" | "assistant", "content": str}]

# Why a record is skipped, in the order checked (read_conversations: one reason per record):
REASONS = (
    "not_json",           # the line is not JSON
    "not_object",         # a JSON value other than an object
    "no_messages",        # no "messages", or it is not a list, or it is empty
    "bad_message",        # a message that is not an object
    "bad_role",           # a role missing, not a str, or not system / user / assistant
    "tool_calls",         # a message with "tool_calls" (the built-in format writes none)
    "bad_content",        # a content missing or not a str
    "empty_content",      # a content that is empty or only whitespace
    "marker_in_content",  # a content that spells a chat marker (it would fake a turn boundary)
    "no_assistant_turn",  # no assistant message: nothing to train on
    "empty_answer",       # an assistant message that is all reasoning: only EOS would be trained
)
# Markers no content may hold. <think> and </think> may: they are how reasoning is written.
_FORBIDDEN_MARKERS = tuple(m for m in CHAT_SPECIAL_TOKENS if m not in (THINK_BEGIN, THINK_END))
_ENCODE_BATCH = 512  # conversations whose pieces go to one encode_batch call


def _show(value: Any, limit: int = 60) -> str:
    """repr(value) cut to one short line, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---- reading JSONL records -------------------------------------------------------------------

def read_conversations(path_or_paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                       strict: bool = False) -> tuple[list[Conversation], dict[str, int]]:
    """The conversations of JSONL files: one JSON object per non-blank line, its "messages" a
    list of {"role": "system" | "user" | "assistant", "content": str} (other keys, of the record
    and of its messages, are ignored and dropped). Files are read in the order given, lines in
    file order.

    A record is kept when check_messages accepts its messages, every content is a non-empty
    (not only whitespace) str spelling no chat marker other than <think> / </think>, and at least
    one assistant message has an answer (text after its reasoning). Any other record is skipped
    and counted under one reason, the first check it fails (REASONS, in the order checked;
    check_messages' checks go message by message, its MessageError naming the reason). With
    strict=True the first such record is refused instead: DataError naming the file, the line
    and the reason.

    Returns (conversations, counts): counts has "kept" and every reason (0 when none), so
    kept + the reasons' sum is the number of non-blank lines. DataError for a path that is not a
    readable file, or a file that is not UTF-8 (naming its line).
    """
    paths = ([path_or_paths] if isinstance(path_or_paths, (str, os.PathLike))
             else list(path_or_paths))
    if not paths:
        raise DataError("read_conversations got no paths; give a JSONL file or a list of them.")
    conversations: list[Conversation] = []
    counts = dict.fromkeys(("kept", *REASONS), 0)
    for path in map(os.fspath, paths):
        for _, messages, reason in iter_records(path, strict=strict):
            if reason is None:
                conversations.append(messages)
            counts[reason or "kept"] += 1
    return conversations, counts


def iter_records(path: str | os.PathLike, *, strict: bool = False
                 ) -> Iterator[tuple[int, Conversation | None, str | None]]:
    """(line number, conversation, None) for each good record of one JSONL file and (line
    number, None, reason) for each bad one, in file order (blank lines skipped; line numbers
    1-based). The checks, strict=True and the DataErrors are read_conversations'."""
    path = os.fspath(path)
    for line_number, line in _lines(path):
        messages, reason, detail = _parse_record(line)
        if reason is not None and strict:
            raise DataError(f"{path}, line {line_number}: {reason}: {detail}; fix or drop "
                            f"the record, or read without strict=True to skip and count "
                            f"such records.")
        yield line_number, messages, reason


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line of the UTF-8 file at `path` (a leading
    byte order mark dropped)."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise DataError(f"conversation file {path} {what} (current directory {os.getcwd()}); "
                        f"give a JSONL file of {{\"messages\": [...]}} records.")
    try:
        with open(path, "rb") as f:
            for index, raw in enumerate(f):
                try:
                    line = raw.decode("utf-8-sig" if index == 0 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"conversation file {path} is not UTF-8 ({e.reason} at byte "
                                    f"{e.start} of line {index + 1}); convert it to UTF-8 "
                                    f"(e.g. iconv -t UTF-8).") from None
                if line.strip():
                    yield index + 1, line
    except OSError as e:
        raise DataError(f"conversation file {path} cannot be read ({e.strerror or e}); make it a "
                        f"readable file.") from None


def _parse_record(line: str) -> tuple[Conversation | None, str | None, str]:
    """(messages, None, "") for a good record, else (None, reason, a one-line detail)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, "not_json", f"{e.msg} at column {e.colno}"
    if not isinstance(record, dict):
        return None, "not_object", f"a JSON {type(record).__name__}, not an object"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        got = f"keys {sorted(record)[:8]}" if "messages" not in record else _show(messages)
        return None, "no_messages", f"no non-empty list 'messages' ({got})"
    try:
        check_messages(messages)
    except MessageError as e:
        return None, e.reason, str(e)
    for i, message in enumerate(messages):
        if not message["content"].strip():
            return None, "empty_content", (f"messages[{i}] ({message['role']}) content "
                                           f"{_show(message['content'])}")
    for i, message in enumerate(messages):
        if marker := next((m for m in _FORBIDDEN_MARKERS if m in message["content"]), None):
            return None, "marker_in_content", f"messages[{i}] ({message['role']}) holds {marker}"
    answers = [answer_of(m["content"]) for m in messages if m["role"] == "assistant"]
    if not answers:
        roles = ", ".join(m["role"] for m in messages)
        return None, "no_assistant_turn", f"roles {roles}: no assistant message to train on"
    if not any(a.strip() for a in answers):
        return None, "empty_answer", "every assistant message is reasoning with no answer after it"
    return [{"role": m["role"], "content": m["content"]} for m in messages], None, ""


# ---- encoding --------------------------------------------------------------------------------

_CHECKED: dict[str, dict[str, int]] = {}  # tokenizer sha256 -> its markers' ids


def check_chat_tokenizer(tokenizer: Tokenizer) -> dict[str, int]:
    """{marker: id} for each marker the chat format writes (template.SPECIAL_TOKENS), after
    checking that each encodes as exactly one id, alone and inside text. DataError naming the
    first that does not: the tokenizer predates the chat markers. Checked once per tokenizer
    (by its sha256)."""
    if (known := _CHECKED.get(tokenizer.sha256)) is not None:
        return known
    ids = {}
    for marker in SPECIAL_TOKENS:
        alone = list(tokenizer.encode(marker))
        inside = list(tokenizer.encode(f"x{marker}\n"))
        if len(alone) != 1 or inside.count(alone[0]) != 1:
            missing = [m for m in SPECIAL_TOKENS if len(tokenizer.encode(m)) != 1]
            others = f" (and {len(missing) - 1} other markers)" if len(missing) > 1 else ""
            raise DataError(f"the tokenizer {tokenizer.path} predates the chat markers: "
                            f"{marker} encodes as {len(alone)} ids {alone[:8]}, not one{others};"
                            f" retrain it (delete it and a run trains one that reserves them) "
                            f"or use a release tokenizer.json (DeepSeek's).")
        ids[marker] = alone[0]
    _CHECKED[tokenizer.sha256] = ids
    return ids


def _pieces(messages: Conversation, keep_last_reasoning: bool = False
            ) -> list[tuple[str, bool]]:
    """The rendered conversation cut at its assistant spans: [(text, is_span), ...], empty
    pieces left out; the texts concatenated are render_with_assistant_spans' text."""
    text, spans = render_with_assistant_spans(messages, keep_last_reasoning=keep_last_reasoning)
    pieces, end = [], 0
    for start, stop in spans:
        pieces += [(text[end:start], False), (text[start:stop], True)]
        end = stop
    pieces.append((text[end:], False))
    return [(piece, is_span) for piece, is_span in pieces if piece]


def _join(pieces: list[tuple[str, bool]], encoded: Iterable) -> tuple[np.ndarray, np.ndarray]:
    ids = [np.asarray(piece_ids, np.int32) for piece_ids in encoded]
    mask = [np.full(len(piece_ids), is_span) for piece_ids, (_, is_span) in zip(ids, pieces)]
    return np.concatenate(ids), np.concatenate(mask)


def encode_conversation(messages: Conversation, tokenizer: Tokenizer, *,
                        keep_last_reasoning: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [T], loss_mask bool [T]) of one conversation (the module docstring's encoding):
    ids start with BOS; loss_mask is True on the tokens of each answer + EOS and nowhere else.
    ValueError (check_messages') for messages the format does not write; DataError when the
    tokenizer lacks the chat markers (check_chat_tokenizer). keep_last_reasoning: the last
    answer's reasoning is kept and masked too (render_with_assistant_spans'); the record rules
    are unchanged (an answer that is all reasoning is still skipped as empty_answer)."""
    check_chat_tokenizer(tokenizer)
    pieces = _pieces(messages, keep_last_reasoning)
    return _join(pieces, tokenizer.encode_batch([p for p, _ in pieces], num_threads=1))


def encode_conversations(conversations: Iterable[Conversation], tokenizer: Tokenizer,
                         max_tokens: int, *, num_threads: int = -1,
                         keep_last_reasoning: bool = False
                         ) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, int]]:
    """([(ids int32 [T_i], loss_mask bool [T_i]), ...], counts) as encode_conversation gives
    them, in order, for the conversations with T_i <= max_tokens (the training sequence length).
    Longer ones are skipped, never cut: counts = {"kept": ..., "too_long": ...}. Pieces are
    encoded in batches on `num_threads` threads (-1: all cores). DataError naming the
    conversation's index for one the format does not write."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise DataError(f"max_tokens={max_tokens!r} must be an int >= 2: the most tokens a "
                        f"conversation may have (the training sequence length, data.seq_len).")
    check_chat_tokenizer(tokenizer)
    examples, counts = [], {"kept": 0, "too_long": 0}
    numbered = enumerate(conversations)
    while batch := list(itertools.islice(numbered, _ENCODE_BATCH)):
        cut = []
        for index, messages in batch:
            try:
                cut.append(_pieces(messages, keep_last_reasoning))
            except ValueError as e:
                raise DataError(f"conversations[{index}]: {e}") from None
        encoded = iter(tokenizer.encode_batch([p for pieces in cut for p, _ in pieces],
                                              num_threads=num_threads))
        for pieces in cut:
            ids, mask = _join(pieces, itertools.islice(encoded, len(pieces)))
            if len(ids) > max_tokens:
                counts["too_long"] += 1
            else:
                examples.append((ids, mask))
                counts["kept"] += 1
    return examples, counts


def target_mask(loss_mask: np.ndarray) -> np.ndarray:
    """bool [T - 1]: loss_mask[1:], whether the loss of the logits at position t (predicting
    ids[t + 1]) counts; aligned with logits[:-1] and targets ids[1:]. Works on [..., T] too."""
    loss_mask = np.asarray(loss_mask)
    if loss_mask.ndim < 1 or loss_mask.dtype != bool:
        raise ValueError(f"loss_mask must be a bool array [..., T], got {loss_mask.dtype} "
                         f"{list(loss_mask.shape)}; give encode_conversation's loss_mask.")
    return loss_mask[..., 1:]


# ---- the built-in corpus: documented standard-library functions --------------------------------

PROMPT = "Write the body of this function:\n\n"
MAX_BODY_CHARS = 2000


def function_conversations(source: str, *, max_body_chars: int = MAX_BODY_CHARS
                           ) -> list[tuple[str, Conversation]]:
    """[(qualname, conversation), ...] in source order for each documented function of a Python
    `source`: its module-level functions and the methods of its module-level classes.

    The user asks PROMPT + the function's decorators, signature and docstring (their source
    lines, up to the docstring's closing quotes); the assistant answers with the rest of the
    function (its lines after the docstring's, leading blank lines dropped). Both are dedented
    by the def line's indentation (a line not starting with it is kept as it is), so
    user text after PROMPT + "\\n" + answer is the function's source at column 0.

    Skipped: a body that is empty, only `pass` / `...`, or only `raise NotImplementedError`, a
    body longer than `max_body_chars`, a body sharing a line with the docstring, and text that
    spells a chat marker. SyntaxError / ValueError for a source that does not parse.
    """
    source = source.replace("\r\n", "\n").replace("\r", "\n")  # ast's line ends, nothing else
    with warnings.catch_warnings():  # old sources' invalid escapes
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(source)
    lines = source.split("\n")
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            found += [(f"{node.name}.{child.name}", child) for child in node.body
                      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))]
    conversations = []
    for qualname, function in found:
        parts = _function_parts(function, lines, max_body_chars)
        if parts is not None:
            head, body = parts
            conversations.append((qualname, [{"role": "user", "content": PROMPT + head},
                                             {"role": "assistant", "content": body}]))
    return conversations


def _function_parts(function: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str],
                    max_body_chars: int) -> tuple[str, str] | None:
    """(decorators + signature + docstring, body after it), dedented; None when skipped."""
    doc, rest = function.body[0], function.body[1:]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)) or not rest or _is_stub(rest):
        return None
    if rest[0].lineno <= doc.end_lineno:  # `"""doc"""; return x`
        return None
    first = min([function.lineno] + [d.lineno for d in function.decorator_list])
    indent = lines[function.lineno - 1][:function.col_offset]
    body_lines = lines[doc.end_lineno:rest[-1].end_lineno]
    while body_lines and not body_lines[0].strip():
        body_lines.pop(0)
    head = _dedent(lines[first - 1:doc.end_lineno], indent)
    body = _dedent(body_lines, indent)
    if len(body) > max_body_chars or any(m in head or m in body for m in CHAT_SPECIAL_TOKENS):
        return None
    return head, body


def _is_stub(body: list[ast.stmt]) -> bool:
    """Only `pass` / `...` statements, or a lone `raise NotImplementedError[(...)]`."""
    if all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                       and s.value.value is Ellipsis) for s in body):
        return True
    if len(body) == 1 and isinstance(body[0], ast.Raise) and body[0].exc is not None:
        exc = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _dedent(lines: list[str], indent: str) -> str:
    return "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines)


def iter_builtin_conversations(split: str = "train", *, validation_fraction: float | None = None
                               ) -> Iterator[tuple[str, str, Conversation]]:
    """(file key, qualname, conversation) of function_conversations over the standard library's
    files (corpus.builtin_files: sorted by key) in `split`, in order. A file is in the split the
    built-in pre-training corpus puts it in (Corpus.in_split of its key, with
    `validation_fraction`, None: the run config's default), so validation conversations come
    from files pre-training did not train on. Files that are not UTF-8 or do not parse are
    skipped. Lazy: each file is read and parsed when reached."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}; use one of them.")
    if validation_fraction is None:
        from dsv3_jax.train.run_config import base_config  # the one owner of the default
        validation_fraction = base_config().data.validation_fraction
    if not isinstance(validation_fraction, (int, float)) or not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction!r} must be strictly between "
                         f"0 and 1 (data.validation_fraction), e.g. 0.05.")
    files = builtin_files()
    corpus = Corpus(BUILTIN, sysconfig.get_paths()["stdlib"], files, float(validation_fraction),
                    "text", builtin=True)
    for file in files:
        if not corpus.in_split(file.key, split):
            continue
        try:
            with open(file.path, "rb") as f:
                conversations = function_conversations(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
            continue
        for qualname, conversation in conversations:
            yield file.key, qualname, conversation


def builtin_conversations(split: str = "train", limit: int | None = None, *,
                          validation_fraction: float | None = None) -> list[Conversation]:
    """The first `limit` (None: all) conversations of iter_builtin_conversations(split): SFT data
    with no download. Deterministic for a given Python; all of train reads ~95% of the standard
    library (seconds), a limit stops early."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r} must be None (all) or an int >= 0.")
    found = iter_builtin_conversations(split, validation_fraction=validation_fraction)
    return [conversation for _, _, conversation in itertools.islice(found, limit)]


__all__ = ["MAX_BODY_CHARS", "PROMPT", "REASONS", "Conversation", "builtin_conversations",
           "check_chat_tokenizer", "encode_conversation", "encode_conversations",
           "function_conversations", "iter_builtin_conversations", "iter_records",
           "read_conversations",
           "target_mask"]
