"""Decoding speed over the latent cache, with and without MTP speculative decoding.

  python experiments/bench_decode.py --checkpoint=runs/small           # a trained model (GPU)
  python experiments/bench_decode.py --preset=small                    # random weights: speed only
  python experiments/bench_decode.py --smoke                           # CPU, tiny: correctness

For each batch size: one untimed run (compiles), then a timed run of plain greedy decoding and of
speculative greedy decoding on the same prompts. Reports generated tokens/s (all sequences), the
per-token latency of one sequence (decode time / new tokens per sequence), steps, the MTP draft
acceptance rate and the speed-up. The baseline is plain decoding of the same model in the same
run. Greedy speculative output must equal greedy output: any mismatch exits non-zero.

Prompts: with a checkpoint that has a tokenizer, slices of real text (this Python's standard
library sources, the built-in corpus); otherwise random token ids (whose acceptance rate says
nothing: a random MTP head drafts at chance).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import jax
import numpy as np

import dsv3_jax as ds
from dsv3_jax.infer.generate import generate_tokens
from dsv3_jax.model.tree import abstract_params


def _prompts(cfg, tokenizer, batch: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    if tokenizer is None:
        return [rng.integers(3, cfg.vocab_size, length).tolist() for _ in range(batch)]
    from dsv3_jax.data.corpus import builtin_files

    files = builtin_files()
    prompts = []
    while len(prompts) < batch:
        f = files[rng.integers(len(files))]
        ids = tokenizer.encode(pathlib.Path(f.path).read_text(errors="ignore"))
        if len(ids) > length:
            start = rng.integers(len(ids) - length)
            prompts.append(ids[start:start + length])
    return prompts


def _random_params(cfg, seed):
    rng = np.random.default_rng(seed)
    shapes = abstract_params(cfg)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['weight']"):
            return np.ones(leaf.shape, leaf.dtype)
        if "e_score_correction_bias" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        return (cfg.init_std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="", help="training workdir / Orbax / HF folder")
    ap.add_argument("--preset", default="small", help="random-weight model when no checkpoint")
    ap.add_argument("--batch_sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few tokens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    tokenizer = None
    if args.checkpoint:
        from dsv3_jax.data.tokenizer import load_tokenizer
        from dsv3_jax.infer.load import load_for_inference

        cfg, params, tok_path = load_for_inference(args.checkpoint)
        params = jax.device_put(params)
        tokenizer = load_tokenizer(tok_path) if tok_path else None
        source = args.checkpoint
    else:
        preset = "tiny" if args.smoke else args.preset
        cfg = ds.get_model_config(preset)
        params = _random_params(cfg, args.seed)
        source = f"{preset} (random weights)"
    if args.smoke:
        args.batch_sizes, args.prompt_len, args.new_tokens = "3", 16, 12

    print(f"# bench_decode: {source}; device {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {datetime.date.today()}; prompt {args.prompt_len}, "
          f"new tokens {args.new_tokens}, greedy")
    print("| batch | plain tok/s | plain ms/token | spec tok/s | spec ms/token | acceptance | "
          "speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    mismatches = 0
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = _prompts(cfg, tokenizer, batch, args.prompt_len, args.seed + batch)
        rows = {}
        for speculative in (False, True):
            run = lambda: generate_tokens(cfg, params, prompts, max_new_tokens=args.new_tokens,
                                          speculative=speculative)
            run()  # compile
            rows[speculative] = run()
        plain, spec = rows[False], rows[True]
        same = plain.tokens == spec.tokens
        mismatches += not same
        per_token = lambda r: 1e3 * r.stats["decode_seconds"] / max(args.new_tokens - 1, 1)
        print(f"| {batch} | {plain.stats['tokens_per_sec']:,.1f} | {per_token(plain):.2f} | "
              f"{spec.stats['tokens_per_sec']:,.1f} | {per_token(spec):.2f} | "
              f"{spec.stats['acceptance_rate']:.1%} | "
              f"{spec.stats['tokens_per_sec'] / plain.stats['tokens_per_sec']:.2f}x | "
              f"{'yes' if same else 'NO'} |", flush=True)
    if mismatches:
        print(f"FAIL: speculative greedy differed from greedy at {mismatches} batch size(s)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
