"""python -m dsv3_jax.serve --checkpoint=<workdir | Orbax folder | HF folder> [--port=8000 ...]

An OpenAI-compatible server (serve/app.py) over a continuous-batching engine (serve/engine.py):

  python -m dsv3_jax.serve --checkpoint=runs/tiny_sft --port=8000
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "tiny_sft", "messages": [{"role": "user", "content": "Hi"}]}'

or any OpenAI client with base_url="http://127.0.0.1:8000/v1". Ctrl-C (or SIGTERM) shuts down
gracefully: new requests get 503, running streams finish, then the process exits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

from absl import flags

from dsv3_jax import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Training workdir, Orbax folder or HF folder.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_MODEL_NAME = flags.DEFINE_string("model_name", "", "The model's name in the API (default: the "
                                  "checkpoint folder's name).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Streams decoded together (batch slots).")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 0, "Positions per stream, prompt and answer "
                                    "together (0: the model's max_seq_len).")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 256, "Prompt tokens per model call: a long "
                                      "prompt is fed in chunks between decode steps.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Positions per page of the latent cache.")
_CACHE_TOKENS = flags.DEFINE_integer("cache_tokens", 0, "The latent cache's size in positions, "
                                     "shared by all streams (0: max_batch x max_seq_len); a "
                                     "request waits until its prompt + max_tokens fit.")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "MTP speculative decoding: the first MTP "
                                 "module drafts a token per stream and step, which the main "
                                 "model verifies (greedy answers unchanged).")
_QUEUE_SIZE = flags.DEFINE_integer("queue_size", 64, "Requests that may wait for a batch slot; "
                                   "more get 429.")
_QUEUE_TIMEOUT = flags.DEFINE_float("queue_timeout", 60.0, "Seconds a request may wait for a "
                                    "batch slot before it gets 503.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "A tokenizer, when the checkpoint has none (or "
                                 "to override it).")
_SHUTDOWN_TIMEOUT = flags.DEFINE_float("shutdown_timeout", 300.0, "Seconds running streams get "
                                       "to finish at shutdown.")
flags.mark_flags_as_required(["checkpoint"])


def _check_flags() -> None:
    for flag, low in ((_PORT, 1), (_MAX_BATCH, 1), (_PREFILL_CHUNK, 1), (_QUEUE_SIZE, 0),
                      (_MAX_SEQ_LEN, 0), (_PAGE_SIZE, 1), (_CACHE_TOKENS, 0)):
        if flag.value < low:
            raise cli.UsageError(f"--{flag.name}={flag.value} must be >= {low}.")
    if _PORT.value > 65535:
        raise cli.UsageError(f"--port={_PORT.value} must be a port number (1 to 65535).")
    for flag in (_QUEUE_TIMEOUT, _SHUTDOWN_TIMEOUT):
        if not flag.value > 0:
            raise cli.UsageError(f"--{flag.name}={flag.value} must be a positive number of "
                                 "seconds.")
    if not _CHECKPOINT.value.strip():
        raise cli.UsageError("--checkpoint is empty; pass a training workdir, an Orbax folder or "
                             "a Hugging Face folder.")


def _check_address(host: str, port: int) -> None:
    """Binds and releases host:port before the model loads, so a busy port or an address this
    machine does not have is one message, not a traceback after minutes of loading."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another "
                      "--port (or stop what uses it) or a --host of this machine.") from None


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}.")
    _check_flags()
    _check_address(_HOST.value, _PORT.value)
    import uvicorn

    from dsv3_jax.chat.repl import chat_template_of
    from dsv3_jax.data.conversations import check_chat_tokenizer
    from dsv3_jax.data.special_tokens import EOS
    from dsv3_jax.infer.load import load_for_inference
    from dsv3_jax.serve.app import create_app
    from dsv3_jax.serve.engine import Engine

    cfg, params, tokenizer_path = load_for_inference(_CHECKPOINT.value)
    if _SPECULATIVE.value and not cfg.mtp_depth:
        raise cli.UsageError(f"--speculative needs an MTP module, but {_CHECKPOINT.value} has "
                             "none (mtp_depth=0); serve it without --speculative.")
    tokenizer = cli.checkpoint_tokenizer(_CHECKPOINT.value, tokenizer_path, _TOKENIZER.value,
                                         cfg.vocab_size)
    markers = check_chat_tokenizer(tokenizer)  # DataError (exit 1) without the chat markers
    template = chat_template_of(_TOKENIZER.value or tokenizer_path)
    max_seq_len = _MAX_SEQ_LEN.value or cfg.max_seq_len
    if max_seq_len > cfg.max_seq_len:
        raise cli.UsageError(f"--max_seq_len={max_seq_len} exceeds the model's max_seq_len="
                             f"{cfg.max_seq_len}.")
    name = _MODEL_NAME.value or os.path.basename(os.path.normpath(_CHECKPOINT.value))
    engine = Engine(cfg, params, max_batch=_MAX_BATCH.value, max_seq_len=max_seq_len,
                    prefill_chunk=_PREFILL_CHUNK.value, queue_size=_QUEUE_SIZE.value,
                    queue_timeout=_QUEUE_TIMEOUT.value, vocab_limit=tokenizer.vocab_size,
                    page_size=_PAGE_SIZE.value, cache_tokens=_CACHE_TOKENS.value,
                    speculative=_SPECULATIVE.value).start()
    app = create_app(engine, tokenizer, model_name=name, template=template,
                     stop_tokens=sorted({tokenizer.eos_id, markers[EOS]}))
    logging.getLogger("dsv3_jax.serve.access").setLevel(logging.INFO)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """New requests get 503 and running streams finish; uvicorn's own handler would
            also re-raise the signal after the shutdown, ending the process by the signal
            instead of with status 0. A second Ctrl-C forces the exit."""
            engine.shutdown(wait=False)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(app, host=_HOST.value, port=_PORT.value, log_level="warning",
                            timeout_graceful_shutdown=int(_SHUTDOWN_TIMEOUT.value))
    server = Server(config)
    spec = ", MTP speculation" if _SPECULATIVE.value else ""
    print(f"[serving {name} ({cfg.max_seq_len} positions, {max_seq_len} per stream, "
          f"{_MAX_BATCH.value} batch slots{spec}) at http://{_HOST.value}:{_PORT.value}/v1; "
          f"{'its own chat_template' if template else 'the DeepSeek-V3 chat format'}]",
          file=sys.stderr, flush=True)
    server.run()
    engine.shutdown(timeout=_SHUTDOWN_TIMEOUT.value)


if __name__ == "__main__":
    cli.run(main)
