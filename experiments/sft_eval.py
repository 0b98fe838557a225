"""What supervised fine-tuning changed: checkpoints scored on the same held-out conversations.

    PYTHONPATH=. .venv/bin/python experiments/sft_eval.py \
        --checkpoints=runs/tiny,runs/tiny_sft --conversations=64 --max_new_tokens=96

The held-out conversations are the validation split of the built-in ones (documented functions of
standard-library files that pre-training held out; dsv3_jax/data/conversations.py), encoded with
the first checkpoint's tokenizer (every checkpoint must share it) and kept when they fit
--seq_len. For each checkpoint (a training workdir, an Orbax folder or an HF folder), one row:

  answer loss     the mean next-token loss (nats) over the answers' tokens and their closing EOS,
                  teacher-forced, each conversation alone (what SFT's eval_loss measures)
  answer acc      the share of those tokens predicted by the argmax
  ends turn       the share of greedy answers (at most --max_new_tokens) that close with the
                  <｜end▁of▁sentence｜> marker: whether the model learned where an answer stops
  first line      the share whose first line equals the real body's first line (stripped)
  exact           the share equal to the real body (surrounding whitespace stripped)
"""

from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.chat.template import EOS, render_chat
from dsv3_jax.data import conversations as cv
from dsv3_jax.data.tokenizer import load_tokenizer
from dsv3_jax.infer.generate import generate_tokens
from dsv3_jax.infer.load import load_for_inference
from dsv3_jax.infer.sampling import Sampling
from dsv3_jax.model.transformer import DeepSeekV3


def held_out(tokenizer, count: int, seq_len: int):
    """[(messages, ids, loss_mask), ...]: the first `count` validation conversations that fit."""
    found = []
    for messages in cv.builtin_conversations("validation"):
        ids, mask = cv.encode_conversation(messages, tokenizer)
        if len(ids) <= seq_len:
            found.append((messages, ids, mask))
            if len(found) == count:
                break
    return found


def answer_scores(cfg, params, examples) -> tuple[float, float]:
    """(mean loss, accuracy) over the answer tokens, teacher-forced, one conversation at a time
    (each padded to a power of two: few compiles)."""
    model = DeepSeekV3(cfg)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t, method=DeepSeekV3.forward).logits)
    nll, correct, count = 0.0, 0, 0
    for _, ids, mask in examples:
        width = 1 << (len(ids) - 1).bit_length()
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(ids)] = ids
        logits = np.asarray(forward(params, jnp.asarray(tokens))[0, :len(ids) - 1], np.float64)
        targets, counted = ids[1:], cv.target_mask(mask)
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(targets)), targets][counted].sum())
        correct += int((logits.argmax(-1) == targets)[counted].sum())
        count += int(counted.sum())
    return nll / count, correct / count


def greedy_answers(cfg, params, tokenizer, examples, max_new_tokens: int, batch: int):
    """(answers as text, whether each closed with the EOS marker) for the first user turn."""
    eos_marker = tokenizer.token_to_id(EOS)
    stops = tuple(t for t in (tokenizer.eos_id, eos_marker) if t is not None)
    texts, closed = [], []
    for start in range(0, len(examples), batch):
        prompts = [tokenizer.encode(render_chat(m[:1])) for m, _, _ in examples[start:start + batch]]
        out = generate_tokens(cfg, params, prompts, max_new_tokens=max_new_tokens,
                              sampling=Sampling(vocab_limit=tokenizer.vocab_size),
                              stop_tokens=stops)
        for prompt, tokens in zip(prompts, out.tokens):
            new = tokens[len(prompt):]
            closed.append(bool(new) and new[-1] == eos_marker)
            texts.append(tokenizer.decode([t for t in new if t not in stops]))
    return texts, closed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="runs/tiny,runs/tiny_sft")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=256, help="the SFT run's data.seq_len")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--show", type=int, default=2, help="answers printed per checkpoint")
    args = parser.parse_args()
    paths = [p for p in args.checkpoints.split(",") if p]
    tokenizer = None
    rows = []
    for path in paths:
        cfg, params, tokenizer_path = load_for_inference(path)
        if tokenizer is None:
            tokenizer = load_tokenizer(tokenizer_path)
            examples = held_out(tokenizer, args.conversations, args.seq_len)
        elif load_tokenizer(tokenizer_path).sha256 != tokenizer.sha256:
            raise SystemExit(f"{path} has another tokenizer than {paths[0]}; compare checkpoints "
                             f"of one lineage.")
        loss, acc = answer_scores(cfg, params, examples)
        texts, closed = greedy_answers(cfg, params, tokenizer, examples, args.max_new_tokens,
                                       args.batch)
        bodies = [m[1]["content"] for m, _, _ in examples]
        first = np.mean([t.strip().split("\n")[0].strip() == b.strip().split("\n")[0].strip()
                         for t, b in zip(texts, bodies)])
        exact = np.mean([t.strip() == b.strip() for t, b in zip(texts, bodies)])
        rows.append((path, loss, acc, float(np.mean(closed)), float(first), float(exact)))
        for (messages, _, _), text in list(zip(examples, texts))[:args.show]:
            head = messages[0]["content"].split("\n")[2]
            print(f"--- {path}: {head}\n{text.rstrip()}\n--- real body:\n"
                  f"{messages[1]['content'].rstrip()}\n")
    print(f"{len(examples)} held-out conversations (<= {args.seq_len} tokens), greedy answers of "
          f"at most {args.max_new_tokens} tokens; {datetime.date.today()}, jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}\n")
    print("| checkpoint | answer loss | answer acc | ends turn | first line | exact |")
    print("|---|---|---|---|---|---|")
    for path, loss, acc, ends, first, exact in rows:
        print(f"| {path} | {loss:.3f} | {acc:.1%} | {ends:.0%} | {first:.0%} | {exact:.0%} |")


if __name__ == "__main__":
    main()
