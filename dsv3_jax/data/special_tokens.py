"""DeepSeek-V3's chat special tokens: the marker texts its chat template writes (V3 and R1).

Each is one token id in DeepSeek's tokenizer.json, and in every sentencepiece tokenizer trained
here (train_tokenizer reserves them as user-defined symbols). They are spelled with U+FF5C
(FULLWIDTH VERTICAL LINE) as the bars and U+2581 (LOWER ONE EIGHTH BLOCK) between words, as in
DeepSeek's files: `<｜begin▁of▁sentence｜>` is not `<|begin of sentence|>`.

This module is the one owner of the list: the tokenizer trainer and the chat template read it.
"""

_BAR, _WORD_SEP = "\uff5c", "\u2581"


def _marker(*words: str) -> str:
    return f"<{_BAR}{_WORD_SEP.join(words)}{_BAR}>"


BOS = _marker("begin", "of", "sentence")  # starts a conversation (written as text, not by encode)
EOS = _marker("end", "of", "sentence")  # ends each assistant turn
USER = _marker("User")
ASSISTANT = _marker("Assistant")
THINK_BEGIN = "<think>"  # R1's reasoning span
THINK_END = "</think>"
TOOL_CALLS_BEGIN = _marker("tool", "calls", "begin")
TOOL_CALLS_END = _marker("tool", "calls", "end")
TOOL_CALL_BEGIN = _marker("tool", "call", "begin")
TOOL_CALL_END = _marker("tool", "call", "end")
TOOL_SEP = _marker("tool", "sep")
TOOL_OUTPUTS_BEGIN = _marker("tool", "outputs", "begin")
TOOL_OUTPUTS_END = _marker("tool", "outputs", "end")
TOOL_OUTPUT_BEGIN = _marker("tool", "output", "begin")
TOOL_OUTPUT_END = _marker("tool", "output", "end")

# In this order they take ids 3, 4, ... of a trained sentencepiece tokenizer (after pad 0, unk 1,
# eos 2). Appending keeps earlier ids; inserting or removing one renumbers later tokenizers.
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, EOS, USER, ASSISTANT, THINK_BEGIN, THINK_END,
    TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP,
    TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END,
)
