"""HFTokenizer: a Hugging Face `tokenizer.json` (what DeepSeek's releases ship), read with the
`tokenizers` library; the second implementation of tokenizer.Tokenizer.

Special ids come from `tokenizer_config.json` beside the tokenizer.json: `bos_token`, `eos_token`
and `pad_token`, each a string or {"content": ...} naming one of the tokenizer's tokens. There is
no guessing without it: a tokenizer.json with no eos_token is refused (the token stream ends every
document with eos), bos_id is None without a bos_token, pad_id 0 without a pad_token (padding is
marked by segment_ids == 0; the pad id only fills).

encode never adds bos or eos, whatever the tokenizer.json's post-processor says (DeepSeek's adds
bos): the pipeline appends eos after each document and a chat template writes bos as text. Added
tokens (DeepSeek's chat markers among them) are matched in the text, each as its one id.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import tokenizers

from dsv3_jax.data.corpus import DataError

CONFIG_FILE = "tokenizer_config.json"


class HFTokenizer:
    """A loaded tokenizer.json. Ids are in [0, vocab_size); eos_id >= 0; no bos or eos is added.
    `special_tokens` maps each added token's text to its id."""

    def __init__(self, path: str, tokenizer: tokenizers.Tokenizer, *, eos_id: int,
                 bos_id: int | None, pad_id: int, sha256: str):
        self.path = path
        self._tk = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # The library's count, or one past the largest id when the ids have holes.
        self.vocab_size: int = max(tokenizer.get_vocab_size(with_added_tokens=True),
                                   max(vocab.values(), default=-1) + 1)
        self.eos_id, self.bos_id, self.pad_id = eos_id, bos_id, pad_id
        self.sha256 = sha256
        self.special_tokens: dict[str, int] = {
            token.content: i for i, token in sorted(tokenizer.get_added_tokens_decoder().items())}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos or eos."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[np.ndarray]:
        """Token ids of each text, int32 [len_i], without bos or eos. Encoded on the tokenizers
        library's own thread pool (its size is RAYON_NUM_THREADS), or in this thread when
        `num_threads` is 1."""
        if num_threads == 1:
            return [np.asarray(self.encode(t), np.int32) for t in texts]
        encodings = self._tk.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids, keep_special: bool = False) -> str:
        """The text of `ids` (a list or 1-D array). Tokens the tokenizer.json marks special
        (DeepSeek's bos, eos and pad) decode to '' unless `keep_special`; other added tokens (the
        chat markers) decode to their text."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=not keep_special)

    def token_to_id(self, text: str) -> int | None:
        """The id of the token spelled `text` in the tokenizer's own alphabet (a byte-level BPE
        writes a leading space as 'Ġ'), or None when there is none."""
        return self._tk.token_to_id(text)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_hf_tokenizer(path: str, where: str, fix: str = "") -> HFTokenizer:
    """The tokenizer.json at `path` (a file) with its ids from the tokenizer_config.json beside
    it. `where` names the value in messages (e.g. "data.tokenizer='/x/tokenizer.json'"), `fix`
    ends them with another way out (e.g. ", or '' to train one"). DataError on a file the library
    cannot read, a config that is not JSON or names a token the tokenizer lacks, and no eos."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # OSError, UnicodeDecodeError, and the library's bare Exception
        raise DataError(f"{where} is not a Hugging Face tokenizer.json ({_first_line(e)}); "
                        f"give one the tokenizers library wrote, or the folder holding it{fix}."
                        ) from None
    config_path = os.path.join(os.path.dirname(path), CONFIG_FILE)
    config, config_data = _read_config(config_path)
    ids = {key: _token_id(tokenizer, config, key, config_path)
           for key in ("bos_token", "eos_token", "pad_token")}
    if ids["eos_token"] is None:
        beside = (f"its {CONFIG_FILE} sets no eos_token" if config_data
                  else f"there is no {CONFIG_FILE} beside it")
        raise DataError(f"{where} has no eos token, which ends every document in the token "
                        f"stream ({beside}); put a {CONFIG_FILE} with \"eos_token\": <one of its "
                        f"special tokens> in {os.path.dirname(path) or '.'}{fix}.")
    sha = hashlib.sha256(data)
    if config_data:  # the config decides the ids of the stream, so it is part of the identity
        sha.update(b"\0" + config_data)
    return HFTokenizer(path, tokenizer, eos_id=ids["eos_token"], bos_id=ids["bos_token"],
                       pad_id=0 if ids["pad_token"] is None else ids["pad_token"],
                       sha256=sha.hexdigest())


def _read_config(path: str) -> tuple[dict, bytes]:
    """(the parsed tokenizer_config.json, its bytes), or ({}, b'') when there is none."""
    if not os.path.isfile(path):
        return {}, b""
    with open(path, "rb") as f:
        data = f.read()
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not JSON ({e}); fix it or remove it (the tokenizer's "
                        "bos/eos/pad tokens are read from it).") from None
    if not isinstance(config, dict):
        raise DataError(f"{path} holds a {type(config).__name__}, not a JSON object; fix it or "
                        "remove it.")
    return config, data


def _token_id(tokenizer: tokenizers.Tokenizer, config: dict, key: str,
              config_path: str) -> int | None:
    """The id of the token `config[key]` names (a string or {"content": ...}); None when unset."""
    value = config.get(key)
    text = value.get("content") if isinstance(value, dict) else value
    if text is None:
        return None
    if not isinstance(text, str):
        raise DataError(f"{config_path}: {key}={value!r} is not a token; set it to a token's text "
                        "or {\"content\": <its text>}.")
    token_id = tokenizer.token_to_id(text)
    if token_id is None:
        added = tokenizer.get_added_tokens_decoder().values()
        known = (sorted(t.content for t in added if t.special)
                 or sorted(t.content for t in added))
        raise DataError(f"{config_path}: {key} {text!r} is not in the tokenizer's vocabulary; set "
                        f"it to one of its tokens (its special tokens: {_few(known)}).")
    return token_id


def _few(items: list[str], n: int = 8) -> str:
    shown = ", ".join(repr(s) for s in items[:n])
    return (shown + f", ... {len(items) - n} more" if len(items) > n else shown) or "none"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
