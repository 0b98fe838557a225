"""python -m dsv3_jax.generate --checkpoint=runs/tiny --prompt="def main(" [--speculative]

Loads a training workdir, a converted Orbax folder or a Hugging Face folder, encodes the prompt
with the run's (or `--tokenizer`) tokenizer, and streams the continuation to stdout;
timing and, with --speculative, the MTP draft acceptance rate go to stderr.
"""

import dataclasses
import sys

from absl import flags

from dsv3_jax import cli
from dsv3_jax.infer.generate import check_prompts, generate_tokens
from dsv3_jax.infer.load import load_for_inference

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, Orbax folder or HF folder.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_SAMPLING = cli.SamplingFlags(128, "Tokens to generate at most.")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "Draft with the MTP module, verify with "
                                 "the main model (same output distribution, fewer steps).")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "Stop at the tokenizer's end-of-document.")
flags.mark_flags_as_required(["checkpoint", "prompt"])


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}; quote a prompt with spaces: "
                             '--prompt="..."')
    # What can be checked before loading a checkpoint is checked first.
    if not _CHECKPOINT.value.strip():
        raise cli.UsageError("--checkpoint is empty; pass a training workdir, an Orbax folder or "
                             "a Hugging Face folder.")
    if not _PROMPT.value:
        raise cli.UsageError("--prompt is empty; give the text to continue.")
    sampling, max_new, seed = _SAMPLING.read()
    cfg, params, tokenizer_path = load_for_inference(_CHECKPOINT.value)
    tokenizer = cli.checkpoint_tokenizer(_CHECKPOINT.value, tokenizer_path, _SAMPLING.tokenizer,
                                         cfg.vocab_size)
    # Only the tokenizer's pieces are drawn (a release pads the model's vocabulary).
    sampling = dataclasses.replace(sampling, vocab_limit=tokenizer.vocab_size)
    prompt = tokenizer.encode(_PROMPT.value)
    if not prompt:
        raise cli.UsageError(f"--prompt={_PROMPT.value!r} encodes to no tokens; give some text.")
    try:
        check_prompts(cfg, [prompt], max_new)  # the context limit, with its numbers
    except ValueError as e:
        raise cli.UsageError(f"--prompt / --max_new_tokens: {e}") from e
    generated: list[int] = []
    printed = [""]

    def stream(row, new):
        generated.extend(new)
        text = tokenizer.decode(generated)
        if text.startswith(printed[0]):
            print(text[len(printed[0]):], end="", flush=True)
            printed[0] = text

    sys.stdout.write(_PROMPT.value)
    result = generate_tokens(
        cfg, params, [prompt], max_new_tokens=max_new, sampling=sampling,
        speculative=_SPECULATIVE.value, seed=seed,
        stop_tokens=(tokenizer.eos_id,) if _STOP_AT_EOS.value else (), on_tokens=stream)
    sys.stdout.write("\n")
    s = result.stats
    line = (f"[{s['new_tokens']} tokens, prefill {s['prefill_seconds']:.2f} s, "
            f"{s['tokens_per_sec']:.1f} tokens/s, {s['ms_per_step']:.1f} ms/step")
    if "acceptance_rate" in s:
        line += f", MTP draft acceptance {s['acceptance_rate']:.1%}"
    print(line + "]", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
