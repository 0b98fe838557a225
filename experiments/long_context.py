"""Validation loss by position: what a context extension did to each part of a long context.

    PYTHONPATH=. .venv/bin/python experiments/long_context.py \
        --checkpoints=runs/tiny,runs/tiny_1k_noyarn,runs/tiny_1k --length=1024

For each checkpoint (a training workdir, an Orbax folder or an HF folder), the first `--length`
tokens of the first `--documents` validation documents of the corpus that are at least that long
(one document per sequence, so position p really is the p-th token of a document), scored with
teacher forcing: the mean next-token loss (nats) over position buckets [0, 128), [128, 256), ...
doubling up to the length, printed as one table with a row per checkpoint. `--max_seq_len` lets
a checkpoint trained at a shorter context be scored past it (its rope unchanged unless that
switches YaRN on, which the table's yarn column shows).
"""

from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.data.corpus import open_corpus
from dsv3_jax.data.tokenizer import load_tokenizer
from dsv3_jax.infer.load import load_for_inference
from dsv3_jax.model.transformer import DeepSeekV3
from dsv3_jax.train.run_config import base_config


def buckets(length: int, first: int = 128) -> list[tuple[int, int]]:
    """[(0, first), (first, 2 first), (2 first, 4 first), ...] cut at `length`."""
    edges, edge = [0], first
    while edge < length:
        edges.append(edge)
        edge *= 2
    edges.append(length)
    return list(zip(edges[:-1], edges[1:]))


def long_documents(tokenizer, corpus_name: str, length: int, count: int) -> np.ndarray:
    """int32 [count, length + 1]: the first length + 1 tokens of the first `count` validation
    documents holding that many."""
    data_cfg = base_config().data
    data_cfg.corpus = corpus_name
    rows = []
    for text in open_corpus(data_cfg).documents("validation"):
        ids = tokenizer.encode(text)
        if len(ids) > length:
            rows.append(ids[:length + 1])
            if len(rows) == count:
                return np.asarray(rows, np.int32)
    raise SystemExit(f"only {len(rows)} validation documents of the corpus hold {length + 1} "
                     f"tokens; lower --documents or --length.")


def position_losses(cfg, params, tokens: np.ndarray, batch: int) -> np.ndarray:
    """float64 [length]: the mean next-token loss at each position over the documents."""
    model = DeepSeekV3(cfg)

    @jax.jit
    def nll(params, x):
        logits = model.apply({"params": params}, x[:, :-1], with_mtp=False,
                             method=DeepSeekV3.forward).logits
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)[..., 0]

    total = np.zeros(tokens.shape[1] - 1)
    for i in range(0, len(tokens), batch):
        total += np.asarray(nll(params, jnp.asarray(tokens[i:i + batch])), np.float64).sum(0)
    return total / len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", required=True, help="comma-separated checkpoints")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--corpus", default="builtin")
    parser.add_argument("--max_seq_len", type=int, default=0,
                        help="score checkpoints with a shorter context past it (0: as saved)")
    args = parser.parse_args()
    if args.length < 2 or args.documents < 1 or args.batch < 1:
        parser.error("--length must be >= 2, --documents and --batch >= 1")

    rows, tokens, first_tokenizer = [], None, None
    spans = buckets(args.length)
    for path in args.checkpoints.split(","):
        cfg, params, tok = load_for_inference(path)
        if args.max_seq_len and cfg.max_seq_len < args.max_seq_len:
            cfg = cfg.replace(max_seq_len=args.max_seq_len)
        if cfg.max_seq_len < args.length:
            raise SystemExit(f"{path}: max_seq_len={cfg.max_seq_len} < --length={args.length}; "
                             "pass --max_seq_len to score it past its context.")
        if tokens is None:
            first_tokenizer = load_tokenizer(tok)
            tokens = long_documents(first_tokenizer, args.corpus, args.length, args.documents)
        elif tok and load_tokenizer(tok).sha256 != first_tokenizer.sha256:
            raise SystemExit(f"{path} has another tokenizer than {args.checkpoints.split(',')[0]}; "
                             "compare checkpoints of one tokenizer.")
        loss = position_losses(cfg, params, tokens, args.batch)
        rows.append((path, cfg, [loss[a:b].mean() for a, b in spans], loss.mean()))

    print(f"Validation loss (nats) by position, {args.documents} documents x {args.length} "
          f"tokens of corpus {args.corpus!r}; {jax.devices()[0].device_kind}, "
          f"{datetime.date.today().isoformat()}, jax {jax.__version__}\n")
    head = ["checkpoint", "yarn"] + [f"{a}-{b - 1}" for a, b in spans] + ["all"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path, cfg, means, overall in rows:
        yarn = f"s={cfg.rope_factor:g} from {cfg.original_seq_len}" if cfg.use_yarn else "no"
        cells = [path, yarn] + [f"{m:.3f}" for m in means] + [f"{overall:.3f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
