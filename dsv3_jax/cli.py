"""What the command-line entry points (train, generate, chat, convert, plan, eval) share.

`run(main)` replaces `absl.app.run(main)` and gives every entry point the same contract:
- a mistake in the command line (an unknown flag, a flag value that does not parse, a misspelt
  `--config.<section>.<key>` override, a `--config=` file that does not exist) is one line on stderr
  and exit status 2;
- an error while running (a bad setting, a corpus or checkpoint that cannot be used, a path that
  cannot be written: our ValueError subclasses and OSError) is one or two lines on stderr, what is
  wrong, the value and the fix, and exit status 1; anything else is reported the same way, named as
  an internal error;
- `--verbose` or `DSV3_DEBUG=1` shows the traceback instead;
- on Linux, a process started as the entry point (`python -m dsv3_jax.<x>`) first restarts itself
  once with glibc's malloc preferring huge pages (`host_memory.prefer_huge_pages`);
- Ctrl-C is exit status 130. The process always ends with its status, never with a signal: after
  the message it flushes its streams and leaves without running the interpreter's shutdown, where
  native libraries' threads (tensorstore, XLA, TensorBoard's writer) have crashed it before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging

from dsv3_jax import host_memory

_NOISY_LIBRARIES = ("orbax", "grain", "jax")
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
_MAX_LINE = 600

if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "On an error, show the Python traceback (also DSV3_DEBUG=1).")


class UsageError(ValueError):
    """A command line that cannot be run as given (exit status 2)."""


class _QuietLibraries(logging.Filter):
    """Drops the INFO chatter of the checkpoint, data and jax libraries (warnings still show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(f"/{lib}/" in record.pathname for lib in _NOISY_LIBRARIES)
        if noisy and record.exc_info and not debug_requested():
            # A library logging an error it also raises (orbax's background saves): its message
            # stays, its traceback shows only with --verbose; our own message follows.
            record.exc_info, record.exc_text = None, None
        return record.levelno >= logging.WARNING or not noisy


def debug_requested() -> bool:
    verbose = flags.FLAGS["verbose"].value if flags.FLAGS.is_parsed() else "--verbose" in sys.argv
    return bool(verbose) or os.environ.get("DSV3_DEBUG", "") not in ("", "0")


def run(main) -> None:
    """`absl.app.run(main)` with the error contract in the module docstring."""
    if getattr(main, "__module__", None) == "__main__":  # the process is this entry point
        host_memory.prefer_huge_pages()

    def guarded(argv):
        absl_logging.get_absl_handler().addFilter(_QuietLibraries())  # our own log stays readable
        try:
            main(argv)
        except (KeyboardInterrupt, Exception) as e:  # not SystemExit: a status is already set
            if debug_requested():
                raise
            if isinstance(e, KeyboardInterrupt):
                fail("interrupted.", EXIT_INTERRUPTED)
            elif isinstance(e, (app.UsageError, UsageError)):
                fail(str(e), EXIT_USAGE)
            else:  # every error a user can meet ends in a message, not a traceback
                fail(describe(e), EXIT_ERROR)

    _check_config_file(sys.argv)
    app.run(guarded, flags_parser=_parse_flags)


def describe(error: BaseException) -> str:
    """One or two lines for the user: our own errors as they are worded; anything else with its
    type, named as an internal error."""
    text = _short(str(error)) or type(error).__name__
    ours = type(error).__module__.startswith("dsv3_jax")
    if ours or isinstance(error, (OSError, ValueError)):
        return text
    return (f"internal error ({type(error).__name__}): {text}\n"
            "Run again with --verbose (or DSV3_DEBUG=1) for the traceback.")


def _short(text: str) -> str:
    """At most two non-empty lines of `text`, each at most _MAX_LINE characters."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line if len(line) <= _MAX_LINE else line[:_MAX_LINE] + " ..." for line in lines[:2]]
    return "\n".join(lines)


def fail(message: str, status: int = EXIT_ERROR) -> None:
    """Prints `error: message` on stderr and ends the process with `status` (see the docstring)."""
    print(f"error: {message}", file=sys.stderr)
    absl_logging.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


# ------------------------------------------------------------------------------- flag parsing

def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # flags.Error, and what ml_collections raises for a bad override
        if debug_requested():
            raise
        fail(_flag_error_message(argv, e), EXIT_USAGE)


def _check_config_file(argv) -> None:
    """A `--config=` file that does not exist: name the path (ml_collections would report it
    deep inside a traceback, and only when the config is first read)."""
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            value = arg.split("=", 1)[1]
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        path = value.split(":", 1)[0] if not os.path.isfile(value) else value
        if not path:
            fail("--config is empty; pass a run config file, e.g. --config=configs/tiny.py.", EXIT_USAGE)
        if os.path.isdir(path):
            fail(f"--config={value}: {os.path.abspath(path)!r} is a directory; pass a run config "
                 "file in it, e.g. --config=configs/tiny.py.", EXIT_USAGE)
        if not os.path.isfile(path):
            fail(f"--config={value}: no such file {os.path.abspath(path)!r}; pass a run config "
                 "file, e.g. --config=configs/tiny.py (a ':variant' may follow the path).", EXIT_USAGE)


def _flag_error_message(argv, error: BaseException) -> str:
    """The message for a command line that does not parse; a misspelt --config.* override gets
    the message a misspelt key in a config file gets."""
    for arg in argv:  # --config.<a>.<b>=... or --noconfig.<a>.<b>
        match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        if match and (problem := unknown_setting(match.group(1))):
            return problem
    text = str(error).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # a KeyError's repr
    lines = [line.strip() for line in text.replace("\\n", "\n").splitlines() if line.strip()]
    if "Traceback" in text:  # ml_collections wraps the config file's own error in its traceback
        head = lines[0].split(": Error whilst")[0].removeprefix("flag ")
        tail = [line for line in lines if not line.startswith(("File ", "^", "~", "Traceback"))]
        return _short(f"{head}: {tail[-1]}")
    lines = [line for line in lines if not line.startswith("Pass --help")]
    message = _short("\n".join(lines)) or type(error).__name__
    if isinstance(error, flags.UnrecognizedFlagError):
        message += "; --helpfull lists the flags."
    return message


def unknown_setting(dotted: str) -> str | None:
    """None when `dotted` ('train.steps') names a run-config setting, else the message that says
    so and names the closest real one (the message check_run_config gives for a config file)."""
    from dsv3_jax.train.run_config import base_config, unknown_key_message

    node, prefix = base_config(), "config"
    if dotted.split(".")[0] == "rl":  # a GRPO run's section (python -m dsv3_jax.rl)
        from dsv3_jax.rl.config import grpo_base_config
        node = grpo_base_config()
    for key in dotted.split("."):
        if not hasattr(node, "keys"):
            return f"{prefix} is a value, not a section; it has no setting {key!r}."
        if key not in node:
            return unknown_key_message(prefix, key, list(node.keys()))
        node, prefix = node[key], f"{prefix}.{key}"
    return None


# ------------------------------------------------------------------------------- flag values

def check_host_port(flag: str, value: str) -> None:
    """Refuses anything but host:port with a port in [1, 65535] ([v6]:port for IPv6)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{flag}={value!r} is not host:port (e.g. host0:1234, a port in "
                         "[1, 65535]).")


def positive_ints(flag: str, values) -> list[int]:
    """A list flag's values as ints >= 1, or a UsageError naming the one that is not."""
    if not values:
        raise UsageError(f"{flag} is empty; give one or more counts, e.g. {flag}=256,2048.")
    values = [str(v).strip() for v in values]
    for v in values:
        if not v.isdigit() or int(v) < 1:
            raise UsageError(f"{flag}: {v!r} is not a positive integer; e.g. {flag}=256,2048.")
    return [int(v) for v in values]


class SamplingFlags:
    """The flags of every entry point that generates text, defined once: --max_new_tokens (its
    default and help the entry point's), --temperature, --top_k, --top_p, --seed, --tokenizer.
    read() checks their values: (Sampling, max_new_tokens, seed), or a UsageError naming the
    flag."""

    def __init__(self, max_new_tokens: int, max_new_help: str):
        self._max_new = flags.DEFINE_integer("max_new_tokens", max_new_tokens, max_new_help)
        self._temperature = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
        self._top_k = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
        self._top_p = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = all).")
        self._seed = flags.DEFINE_integer("seed", 0, "Sampling seed.")
        self._tokenizer = flags.DEFINE_string(
            "tokenizer", "", "A tokenizer (a .model, a tokenizer.json or its folder), when the "
            "checkpoint has none (or to override it).")

    @property
    def tokenizer(self) -> str:
        return self._tokenizer.value

    def read(self):
        from dsv3_jax.infer.generate import check_max_new_tokens, check_seed
        from dsv3_jax.infer.sampling import Sampling

        try:
            max_new = check_max_new_tokens(self._max_new.value)
            sampling = Sampling(temperature=self._temperature.value, top_k=self._top_k.value,
                                top_p=self._top_p.value)
            seed = check_seed(self._seed.value)
        except ValueError as e:
            raise UsageError(f"--{e}") from e
        return sampling, max_new, seed


def checkpoint_tokenizer(checkpoint: str, found: str | None, override: str, model_vocab_size: int):
    """The tokenizer an entry point reads a checkpoint's text with: `override` (its --tokenizer
    flag) if given, else `found` (the checkpoint's own); a UsageError when there is neither, or
    when it has more pieces than the model's vocabulary."""
    from dsv3_jax.data.tokenizer import load_tokenizer

    path = override or found
    if not path:
        raise UsageError(f"{checkpoint} has no tokenizer (tokenizer.json or tokenizer.model); pass "
                         "--tokenizer=<the tokenizer file matching the checkpoint>.")
    tokenizer = load_tokenizer(path, setting="--tokenizer" if override
                               else f"the tokenizer of {checkpoint}")
    if tokenizer.vocab_size > model_vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                         f"{model_vocab_size}; pass the tokenizer the model was trained with.")
    return tokenizer
