"""Perplexity of a checkpoint on a corpus split: `python -m dsv3_jax.eval perplexity`.

Each document is scored as pre-training reads it, its tokens then eos (the separator after every
document), conditioned on the document-start token (bos when the tokenizer has one, else eos:
what precedes a document in a pre-training row). A document longer than the window is scored in
rolling windows (scoring.rolling_windows: each token once, with the most context the window
holds), so nothing is cut. Over all documents:

  nll_per_token = -sum log p / tokens        perplexity = exp(nll_per_token)
  bits_per_byte = -sum log p / (ln 2 * bytes), bytes = the UTF-8 bytes of the documents' text

The JSON (`perplexity.json`) holds those, the settings, the throughput and each document's
(tokens, nll); every file is written atomically.
"""

from __future__ import annotations

import json
import math
import os
import time

from tqdm import tqdm

from dsv3_jax.eval.scoring import Scorer
from dsv3_jax.files import atomic_file

JSON_FILE = "perplexity.json"


def read_documents(corpus, split: str, max_documents: int = 0) -> list[str]:
    """The split's documents in corpus order, the first max_documents of them (0: all)."""
    texts = []
    for text in corpus.documents(split):
        texts.append(text)
        if max_documents and len(texts) >= max_documents:
            break
    if not texts:
        raise ValueError(f"the {split} split of {corpus.describe()} holds no documents; use "
                         "another corpus or split.")
    return texts


def run_perplexity(cfg, params, tokenizer, texts: list[str], *, batch_size: int = 8,
                   max_length: int | None = None, mesh=None, progress: bool = True) -> dict:
    """The scores of the module docstring for `texts` (a list of documents)."""
    scorer = Scorer(cfg, params, batch_size=batch_size, max_length=max_length, mesh=mesh)
    prefix = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
    docs = [list(ids) + [tokenizer.eos_id] for ids in tokenizer.encode_batch(list(texts))]
    tokens = sum(map(len, docs))
    start = time.perf_counter()
    with tqdm(total=tokens, unit="tok", desc="perplexity", disable=not progress) as bar:
        logps = scorer.rolling_loglikelihood(docs, prefix, bar.update)
    seconds = time.perf_counter() - start
    nll = -math.fsum(logps)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "documents": len(docs), "tokens": tokens, "bytes": n_bytes,
        "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / (math.log(2) * n_bytes) if n_bytes else float("nan"),
        "window": scorer.max_length, "batch_size": scorer.batch_size,
        "seconds": seconds, "tokens_per_sec": tokens / seconds if seconds > 0 else float("nan"),
        "per_document": [{"tokens": len(d), "nll": -lp} for d, lp in zip(docs, logps)],
    }


def format_table(result: dict) -> str:
    head = ("documents", "tokens", "nll/token", "perplexity", "bits/byte", "tokens/s")
    row = (f"{result['documents']}", f"{result['tokens']}", f"{result['nll_per_token']:.4f}",
           f"{result['perplexity']:.3f}", f"{result['bits_per_byte']:.4f}",
           f"{result['tokens_per_sec']:.0f}")
    widths = [max(len(h), len(v)) + 2 for h, v in zip(head, row)]
    title = (f"perplexity of {result.get('checkpoint', 'the model')} on "
             f"{result.get('corpus', 'the texts')} ({result.get('split', '')} split, "
             f"{result['window']}-token window)")
    return "\n".join([title, "".join(h.rjust(w) for h, w in zip(head, widths)),
                      "".join(v.rjust(w) for v, w in zip(row, widths))])


def write_results(result: dict, output_dir: str) -> str:
    path = os.path.join(output_dir, JSON_FILE)
    with atomic_file(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return path
