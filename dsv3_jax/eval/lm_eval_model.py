"""The lm-evaluation-harness model `dsv3_jax`: any checkpoint this project reads, under lm-eval.

    import dsv3_jax.eval, lm_eval
    lm_eval.simple_evaluate(model="dsv3_jax", model_args="checkpoint=runs/tiny", tasks=[...])

(`import dsv3_jax.eval` registers the name; `python -m dsv3_jax.eval lm-eval ...` is the command
line.) lm-eval's `LM` interface over `scoring.Scorer`, which batches by length:

  loglikelihood          (context, continuation) -> (log p, greedy), encoded as lm-eval's
                         TemplateLM encodes them (trailing spaces move to the continuation; the
                         pair is split on the whole text's tokens)
  loglikelihood_rolling  a text -> its log-likelihood in windows of max_length tokens
  generate_until         (context, gen_kwargs) -> text, stopping at `until`, EOS or max_gen_toks
  apply_chat_template    lm-eval's --apply_chat_template: the checkpoint's own chat_template
                         (tokenizer_config.json) when it has one, else the built-in DeepSeek-V3
                         format (dsv3_jax.chat.template)

Model args (model_args="k=v,k=v"; MODEL_ARGS lists them; any other is refused, naming them):
  checkpoint     a training workdir, an Orbax folder or a Hugging Face folder (required)
  tokenizer      a tokenizer file or folder, when the checkpoint has none (or to override it)
  dtype          compute dtype: auto (the checkpoint's), float32 or bfloat16
  batch_size     rows per model call (lm-eval's --batch_size; "auto" gives DEFAULT_BATCH_SIZE)
  max_length     the window in tokens (default: the checkpoint's max_seq_len; more than that
                 runs the model at that max_seq_len, YaRN switching on past original_seq_len)
  max_gen_toks   tokens generated when a task does not say (default 256)
  add_bos_token  start each text with the document-start token, prefix_token_id (default True):
                 bos when the tokenizer has one (DeepSeek's releases), else eos, which separates
                 documents in this project's pre-training; never twice, and not before a chat
                 prompt, which opens with its own BOS
  mesh           a jax Mesh, or mesh sizes as `python -m dsv3_jax.plan` writes them
                 ("expert=8,fsdp=-1"; axes separated by ';' on lm-eval's command line, whose
                 model_args split at commas): params are read straight into their shardings
  seed           seeds sampled generation (do_sample=True)
lm-eval also passes `max_batch_size` and `device`: JAX places the work (the mesh, else the default
device), so they are accepted and, when set, said to have no effect.

Routed experts run dropless (moe_capacity_factor=0): with a capacity, a token's experts could
depend on the other rows of its batch, and batching must not change a score.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from dsv3_jax.chat.template import BOS, EOS, render_chat
from dsv3_jax.eval.scoring import Scorer

log = logging.getLogger("dsv3_jax.eval")

MODEL_NAME = "dsv3_jax"
DEFAULT_BATCH_SIZE = 8
BUILTIN_TEMPLATE = "dsv3_jax built-in DeepSeek-V3 chat format"
MODEL_ARGS = ("checkpoint", "tokenizer", "dtype", "batch_size", "max_length", "max_gen_toks",
              "add_bos_token", "mesh", "seed", "max_batch_size", "device")
DTYPES = ("auto", "float32", "bfloat16")
_SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p", "until", "max_gen_toks"}


class ModelArgError(ValueError):
    """A model arg that cannot be used: what, the value, the fix."""


def _int_arg(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool):
        value = None
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < low:
        raise ModelArgError(f"model arg {name}={value!r} must be an integer >= {low}.")
    return number


def _bool_arg(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ModelArgError(f"model arg {name}={value!r} must be True or False.")


def _mesh_arg(value: Any):
    import jax

    if value is None or isinstance(value, jax.sharding.Mesh):
        return value
    from dsv3_jax.parallel.mesh import make_mesh, parse_mesh_sizes

    text = str(value).replace(";", ",").replace(":", "=")
    try:
        return make_mesh(parse_mesh_sizes(text))
    except ValueError as e:
        raise ModelArgError(f"model arg mesh={value!r}: {str(e).removeprefix('--mesh: ')} "
                            "(on lm-eval's command line separate axes with ';').") from None


def _load_tokenizer(checkpoint: str, found: str | None, override: str, vocab_size: int):
    from dsv3_jax.data.tokenizer import load_tokenizer

    path = override or found
    if not path:
        raise ModelArgError(f"{checkpoint} has no tokenizer (tokenizer.json or tokenizer.model); "
                            "add tokenizer=<the tokenizer file the model was trained with> to "
                            "model_args.")
    tokenizer = load_tokenizer(path, setting="model arg tokenizer" if override
                               else f"the tokenizer of {checkpoint}")
    if tokenizer.vocab_size > vocab_size:
        raise ModelArgError(f"the tokenizer {path} has {tokenizer.vocab_size} pieces but the model "
                            f"only {vocab_size} ids; pass the tokenizer the model was trained "
                            "with (model arg tokenizer=...).")
    return tokenizer


class DSV3LM(TemplateLM):
    """lm-eval's model interface for a dsv3_jax checkpoint (the module docstring)."""

    def __init__(self, checkpoint: str | None = None, **kwargs: Any):
        super().__init__()
        unknown = sorted(set(kwargs) - set(MODEL_ARGS))
        if unknown:
            raise ModelArgError(f"unknown model arg{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(unknown)} for model {MODEL_NAME}; it takes "
                                f"{', '.join(MODEL_ARGS)}.")
        if not str(checkpoint or "").strip():
            raise ModelArgError(f"model {MODEL_NAME} needs model_args=checkpoint=<a training "
                                "workdir, an Orbax folder or a Hugging Face folder>.")
        args = dict(kwargs)
        dtype = str(args.get("dtype") or "auto")
        if dtype not in DTYPES:
            raise ModelArgError(f"model arg dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
        batch_size = args.get("batch_size")
        if batch_size is None or str(batch_size).startswith("auto"):
            if batch_size is not None:
                log.warning("batch_size=%s: dsv3_jax does not search for a batch size; using %d "
                            "(pass an integer to choose).", batch_size, DEFAULT_BATCH_SIZE)
            batch_size = DEFAULT_BATCH_SIZE
        batch_size = _int_arg("batch_size", batch_size, 1)
        max_length = args.get("max_length")
        max_length = None if max_length in (None, "", 0) else _int_arg("max_length", max_length, 2)
        self.max_gen_toks_default = _int_arg("max_gen_toks", args.get("max_gen_toks", 256), 1)
        self.add_bos_token = _bool_arg("add_bos_token", args.get("add_bos_token", True))
        self.seed = _int_arg("seed", args.get("seed", 0), 0)
        for name in ("device", "max_batch_size"):
            if args.get(name) not in (None, "", "cpu", "cuda"):
                log.warning("model arg %s=%s has no effect: JAX places the work (the mesh, else "
                            "its default device).", name, args[name])
        mesh = _mesh_arg(args.get("mesh"))

        from dsv3_jax.chat.repl import chat_template_of
        from dsv3_jax.infer.load import load_for_inference

        cfg, params, tokenizer_path = load_for_inference(str(checkpoint), mesh)
        self.tokenizer = _load_tokenizer(str(checkpoint), tokenizer_path,
                                         str(args.get("tokenizer") or ""), cfg.vocab_size)
        changes: dict[str, Any] = {"moe_capacity_factor": 0.0}
        if dtype != "auto":
            changes["dtype"] = dtype
        if max_length is not None and max_length > cfg.max_seq_len:
            changes["max_seq_len"] = max_length
            if max_length > cfg.original_seq_len and not cfg.use_yarn:
                log.warning("max_length=%d is past the checkpoint's original_seq_len=%d: the "
                            "model runs with YaRN on, unlike the checkpoint.", max_length,
                            cfg.original_seq_len)
        self.cfg = dataclasses.replace(cfg, **changes)
        self.checkpoint = os.path.abspath(str(checkpoint))
        self.scorer = Scorer(self.cfg, params, batch_size=batch_size, max_length=max_length,
                             mesh=mesh)
        self.batch_size = self.scorer.batch_size
        self._template = chat_template_of(self.tokenizer.path)
        self._eos_marker = self.tokenizer.special_tokens.get(EOS)
        self._prefix_text = self.tokenizer.decode([self.prefix_token_id], keep_special=True)
        log.info("dsv3_jax: %s (%s, %d-token window, batch %d), tokenizer %s", self.checkpoint,
                 self.cfg.dtype, self.max_length, self.batch_size, self.tokenizer.path)

    # ----------------------------------------------------------------------------- identity

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return self.tokenizer.eos_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return f"{os.path.basename(self.tokenizer.path)}-{self.tokenizer.sha256[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return self._template if self._template is not None else BUILTIN_TEMPLATE

    # ----------------------------------------------------------------------------- text

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """The ids of `string`; with add_special_tokens (None: add_bos_token), prefix_token_id
        first, unless the string already opens with it or with a chat prompt's BOS."""
        ids = list(self.tokenizer.encode(string))
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        opened = string.startswith(BOS) or (self._prefix_text and
                                            string.startswith(self._prefix_text))
        if add and not opened:
            ids = [self.prefix_token_id] + ids
        return ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt text for lm-eval's messages. add_generation_prompt=False with an assistant
        message last (a prefilled answer): the prompt up to that answer, then its text, left
        open."""
        messages = list(chat_history)
        prefill = ""
        if not add_generation_prompt and messages and messages[-1].get("role") == "assistant":
            prefill = messages.pop()["content"]
            add_generation_prompt = True
        return render_chat(messages, add_generation_prompt=add_generation_prompt,
                           template=self._template) + prefill

    # ----------------------------------------------------------------------------- requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
        pairs = [(context, continuation) for _, context, continuation in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm or not pairs,
                  desc="dsv3_jax loglikelihood") as bar:
            results = self.scorer.loglikelihood(pairs, lambda done: bar.update(len(done)))
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [self.tok_encode(request.args[0], add_special_tokens=False)
                 for request in requests]
        with tqdm(total=sum(map(len, texts)), disable=disable_tqdm or not texts, unit="tok",
                  desc="dsv3_jax loglikelihood_rolling") as bar:
            results = self.scorer.rolling_loglikelihood(texts, self.prefix_token_id, bar.update)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def _sampling(self, kwargs: dict):
        from dsv3_jax.infer.sampling import Sampling

        extra = sorted(set(kwargs) - _SAMPLING_KEYS)
        if extra:
            self.scorer.notice("gen_kwargs", f"dsv3_jax ignores the generation kwargs "
                               f"{', '.join(extra)} (it reads "
                               f"{', '.join(sorted(_SAMPLING_KEYS))}).")
        if not kwargs.get("do_sample"):
            return Sampling(vocab_limit=self.tokenizer.vocab_size)
        try:
            return Sampling(temperature=float(kwargs.get("temperature", 1.0)),
                            top_k=int(kwargs.get("top_k") or 0),
                            top_p=float(kwargs.get("top_p", 1.0)),
                            vocab_limit=self.tokenizer.vocab_size)
        except (TypeError, ValueError) as e:
            raise ValueError(f"a task's generation kwargs {kwargs}: {e}") from None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        eos_text = self.tokenizer.decode([self.eot_token_id], keep_special=True)
        stop_tokens = sorted({self.eot_token_id}
                             | ({self._eos_marker} if self._eos_marker is not None else set()))
        results: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm or not requests,
                  desc="dsv3_jax generate_until") as bar:
            for indices in groups.values():
                kwargs = normalize_gen_kwargs(requests[indices[0]].args[1],
                                              self.max_gen_toks_default)
                until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
                if self._eos_marker is not None and EOS not in until:
                    until.append(EOS)
                max_new = int(kwargs["max_gen_toks"])
                prompts = [self.tok_encode(requests[i].args[0]) for i in indices]
                texts = self.scorer.generate(
                    prompts, max_new_tokens=max_new, stop_strings=until, stop_tokens=stop_tokens,
                    decode=lambda ids: self.tokenizer.decode(ids, keep_special=True),
                    sampling=self._sampling(kwargs), seed=self.seed, progress=bar.update)
                for i, text in zip(indices, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results
