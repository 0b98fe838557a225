"""The default run: the tiny model on the built-in corpus (this Python's standard library sources),
on CPU in a few minutes (`make train`).

Variants: `--config=configs/tiny.py:smoke` (a few steps, for checking a setup end to end).
"""

from dsv3_jax.train.run_config import base_config


def get_config(arg: str = ""):
    c = base_config("tiny")
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.train.steps = 300
    c.train.lr = 3e-3
    c.train.warmup_steps = 30
    c.train.eval_every = 100
    c.train.eval_batches = 8
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    if arg == "smoke":
        c.train.steps = 4
        c.train.eval_every = 2
        c.train.eval_batches = 1
        c.train.checkpoint_every = 2
        c.train.log_every = 1
    elif arg:
        raise ValueError(f"configs/tiny.py: unknown variant {arg!r}; use '' or 'smoke'.")
    return c
