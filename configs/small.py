"""The small model (about 1B total / 0.26B active parameters) on one GPU.

Variants: `:bf16_moments` keeps AdamW's moments in bf16.
"""

from dsv3_jax.train.run_config import base_config


def get_config(arg: str = ""):
    c = base_config("small")
    c.model.remat_policy = "dots_no_batch"
    c.data.seq_len = 2048
    c.data.batch_size = 32
    c.train.steps = 20000
    c.train.lr = 1e-3
    c.train.warmup_steps = 500
    c.train.eval_every = 1000
    c.train.eval_batches = 16
    c.train.checkpoint_every = 1000
    c.train.log_every = 20
    for variant in filter(None, arg.split(",")):
        if variant == "bf16_moments":
            c.train.bf16_moments = True
        else:
            raise ValueError(f"configs/small.py: unknown variant {variant!r}; known: bf16_moments.")
    return c
