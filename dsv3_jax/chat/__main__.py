"""python -m dsv3_jax.chat --checkpoint=runs/tiny_sft [--system="..."] [--think]

An interactive multi-turn chat with a checkpoint (a training workdir, a converted Orbax folder or a
Hugging Face folder with its tokenizer.json): one line of stdin is one user turn; the answer
streams to stdout, one line of statistics per turn to stderr; a line ending with a backslash
continues the turn on the next line (for code). The latent cache is kept across
turns: each turn feeds only the tokens the cache does not hold yet (dsv3_jax/infer/session.py).

Commands: /reset (a new conversation, the system prompt kept), /system <text> (a new system
prompt; /system alone clears it), /help, /quit (or end of input).
"""

import sys

from absl import flags

from dsv3_jax import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Training workdir, Orbax folder or HF folder.")
_SYSTEM = flags.DEFINE_string("system", "", "The system prompt.")
_SAMPLING = cli.SamplingFlags(256, "Tokens per answer at most.")
_THINK = flags.DEFINE_bool("think", False, "Show the model's <think>...</think> reasoning "
                           "(hidden by default; earlier turns' reasoning is never shown to the "
                           "model again, as the chat format drops it).")
flags.mark_flags_as_required(["checkpoint"])

HELP = ("end a line with \\ to continue the turn on the next; commands: /reset (new "
        "conversation), /system <text> (new system prompt; /system alone clears it), /help, /quit")


def main(argv):
    from dsv3_jax.chat.repl import Chat, ContextFullError, chat_template_of
    from dsv3_jax.data.corpus import DataError
    from dsv3_jax.infer.load import load_for_inference

    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}; the chat reads its turns from "
                             "stdin (quote --system values with spaces).")
    if not _CHECKPOINT.value.strip():
        raise cli.UsageError("--checkpoint is empty; pass a training workdir, an Orbax folder or "
                             "a Hugging Face folder.")
    sampling, max_new, seed = _SAMPLING.read()
    cfg, params, tokenizer_path = load_for_inference(_CHECKPOINT.value)
    tokenizer = cli.checkpoint_tokenizer(_CHECKPOINT.value, tokenizer_path, _SAMPLING.tokenizer,
                                         cfg.vocab_size)
    try:
        template = chat_template_of(_SAMPLING.tokenizer or tokenizer_path)
        chat = Chat(cfg, params, tokenizer, template=template, system=_SYSTEM.value,
                    sampling=sampling, seed=seed, max_new_tokens=max_new,
                    show_thinking=_THINK.value)
    except (DataError, ValueError) as e:
        raise cli.UsageError(f"cannot chat with {_CHECKPOINT.value}: {e}") from e
    interactive = sys.stdin.isatty()
    note = lambda text: print(text, file=sys.stderr, flush=True)
    note(f"[chat with {_CHECKPOINT.value}: {cfg.max_seq_len} tokens of context, "
         f"{'its own chat_template' if template else 'the DeepSeek-V3 chat format'}; {HELP}]")
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        while text.endswith("\\"):  # a turn of several lines: each but the last ends with \
            more = sys.stdin.readline()
            text = text[:-1] + "\n" + more.rstrip("\n")
            if not more:
                break
        if not text.strip():
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command == "/quit":
                break
            elif command == "/reset":
                chat.reset()
                note("[a new conversation]")
            elif command == "/system":
                chat.set_system(rest.strip())
                note(f"[system prompt {'set' if rest.strip() else 'cleared'}]")
            elif command == "/help":
                note(f"[{HELP}]")
            else:
                note(f"[unknown command {command}; {HELP}]")
            continue
        try:
            stats = chat.reply(text, lambda s: print(s, end="", flush=True))
        except ContextFullError as e:
            note(f"[{e} Start a new conversation with /reset.]")
            continue
        except ValueError as e:  # a chat template refusing the conversation
            note(f"[the chat format refused this turn: {e}]")
            continue
        print(flush=True)
        ended = {"stop": "", "max_new_tokens": ", cut at --max_new_tokens",
                 "context": ", the context is full: /reset"}[stats.stopped]
        note(f"[{stats.new_tokens} new tokens, {stats.reused} reused from the cache, "
             f"{stats.fed} fed, prefill {stats.prefill_seconds:.2f} s, "
             f"{stats.tokens_per_sec:.1f} tokens/s{ended}]")


if __name__ == "__main__":
    cli.run(main)
