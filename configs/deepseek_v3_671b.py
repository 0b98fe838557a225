"""DeepSeek-V3 671B with the report's pre-training recipe (SPEC.md section 4), for a large mesh.

AdamW 0.9/0.95, weight decay 0.1, clip 1.0, sequence 4096, warm-up to 2.2e-4 over 2K steps,
constant, then cosine to 2.2e-5; MTP weight 0.3; balance alpha 1e-4; bias gamma 0.001; bf16 moments.
Steps assume the final 15360-sequence batch (14.8T tokens / 63M tokens per step); the report's batch
ramp and its late constant phases are not modelled. Set the mesh for your slice, e.g.
`--config.mesh.expert=64 --config.mesh.fsdp=-1`.
"""

from dsv3_jax.train.run_config import base_config


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"configs/deepseek_v3_671b.py takes no variant, got {arg!r}.")
    c = base_config("deepseek-v3-671b")
    c.model.max_seq_len = 4096  # pre-training context; YaRN extension is a later stage
    c.model.remat_policy = "full"
    c.data.seq_len = 4096
    c.data.batch_size = 15360
    c.data.tokenizer = ""  # a sentencepiece .model for your corpus; "" trains one in the workdir
    c.train.steps = 235_000
    c.train.lr = 2.2e-4
    c.train.warmup_steps = 2000
    c.train.schedule = "warmup_constant_cosine"
    c.train.decay_start_fraction = 0.67  # constant to 10T of 14.8T tokens, then cosine
    c.train.final_lr_ratio = 0.1
    c.train.bf16_moments = True
    c.train.mtp_lambda = 0.3
    c.train.balance_alpha = 1e-4
    c.train.bias_gamma = 0.001
    c.train.checkpoint_every = 500
    c.train.eval_every = 1000
    c.train.log_every = 1
    c.mesh.expert = 64
    c.mesh.fsdp = -1
    return c
