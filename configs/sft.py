"""Supervised fine-tuning (DeepSeek-V3 report, section 5.1): from trained weights
(`config.train.init_from`), train on conversations with the loss on the assistants' answers only
(`config.data.task = "sft"`, dsv3_jax/data/sft.py).

    python -m dsv3_jax.train --config=configs/sft.py --workdir=runs/tiny_sft \
        --config.train.init_from=runs/tiny [--config.data.corpus=chats.jsonl]

The corpus is JSONL records {"messages": [{"role": "system" | "user" | "assistant",
"content": ...}, ...]}; the default, "builtin", is conversations made from this Python's standard
library: "Write the body of this function:" + a documented function's signature and docstring ->
its real body (validation conversations come from files pre-training held out). Conversations are
rendered with the DeepSeek-V3 chat format and packed several to a sequence, each isolated from
the others by its segment id (the report's "sample masking").

The report fine-tunes for two epochs with a cosine learning rate from 5e-6 to 1e-6.

Variants (`--config=configs/sft.py:<variant>`):
  (none)  the tiny model of `make train` (init_from runs/tiny): 256-token sequences, 300 steps of
          16 (about two epochs of the built-in conversations), a few minutes on a CPU (`make sft`).
  arithmetic  the tiny model on the arithmetic task's worked solutions (`make grpo`'s first
          stage; corpus `python -m dsv3_jax.rl.sft_data --output=runs/arithmetic_sft.jsonl`):
          the answers' reasoning is trained on (data.sft_reasoning "last"), so the model writes
          "<think>\n3 + 5 = 8\n</think>\n\n8", the format GRPO's rewards check. 600 steps
          of 16, about 19 min on a 2-core CPU (held-out answer loss still falling at 600).
  v3      the 671B model with the report's learning rate; 4,096-token sequences and 128 per step
          (the report gives neither); set init_from to the pre-trained (or context-extended)
          weights, and config.train.steps to two epochs of the data (2,000 steps here).
"""

from dsv3_jax.train.run_config import base_config

VARIANTS = ("", "arithmetic", "v3")


def _sft_data(c, seq_len: int, batch_size: int) -> None:
    c.data.task = "sft"
    c.data.corpus = "builtin"
    c.data.seq_len = seq_len
    c.data.batch_size = batch_size


def _cosine(c, lr: float, final_lr: float, warmup_steps: int) -> None:
    c.train.schedule = "cosine"
    c.train.lr = lr
    c.train.final_lr_ratio = final_lr / lr
    c.train.warmup_steps = warmup_steps


def get_config(arg: str = ""):
    if arg not in VARIANTS:
        raise ValueError(f"configs/sft.py: unknown variant {arg!r}; use '' (the tiny model), "
                         f"'arithmetic' or 'v3' (e.g. --config=configs/sft.py:v3).")
    if arg == "v3":
        c = base_config("deepseek-v3-671b")
        _sft_data(c, seq_len=4096, batch_size=128)
        _cosine(c, lr=5e-6, final_lr=1e-6, warmup_steps=0)
        c.model.remat_policy = "full"
        c.train.steps = 2000
        c.train.bf16_moments = True
        c.train.checkpoint_every = 200
        c.train.eval_every = 200
        c.train.eval_batches = 4
        c.train.log_every = 1
        c.mesh.expert = 64
        c.mesh.fsdp = -1
        c.train.init_from = ""  # the pre-trained weights: --config.train.init_from=...
        return c
    if arg == "arithmetic":
        c = base_config("tiny")
        _sft_data(c, seq_len=256, batch_size=16)
        c.data.corpus = "runs/arithmetic_sft.jsonl"
        c.data.sft_reasoning = "last"
        _cosine(c, lr=1e-3, final_lr=1e-4, warmup_steps=20)
        c.train.steps = 600
        c.train.init_from = "runs/tiny"
        c.train.eval_every = 100
        c.train.eval_batches = 4
        c.train.checkpoint_every = 100
        c.train.log_every = 10
        return c
    c = base_config("tiny")
    _sft_data(c, seq_len=256, batch_size=16)
    # The tiny run's peak is 3e-3; a tenth of it, decayed to a fifth of that (the report's
    # 5e-6 -> 1e-6 ratio), with a short warm-up for the fresh optimizer.
    _cosine(c, lr=3e-4, final_lr=6e-5, warmup_steps=10)
    c.train.steps = 300
    c.train.init_from = "runs/tiny"  # the make train workdir
    c.train.eval_every = 50
    c.train.eval_batches = 8
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    return c
