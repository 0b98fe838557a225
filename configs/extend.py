"""Long-context extension stages (DeepSeek-V3 report, section 4.3): from trained weights
(`config.train.init_from`), continue training on longer packed sequences with YaRN.

The report extends its 4K pre-trained model in two stages of 1,000 steps each, 4K -> 32K -> 128K,
YaRN on the decoupled rope part only (our rope applies to the R rope dims only, SPEC.md section 2)
with scale s = 40, alpha = 1, beta = 32 and sqrt(t) = 0.1 ln s + 1 in both stages, learning rate
7.3e-6 (the end of pre-training's), batch 1,920 sequences at 32K and 480 at 128K.

Variants (`--config=configs/extend.py:<variant>`):
  32k          671B, stage 1: from the 4K pre-trained workdir (set init_from), 32,768 positions.
  128k         671B, stage 2: from stage 1's workdir, 131,072 positions.
  tiny         the default tiny run (`make train`, 128 positions) extended to 1,024 positions
               with YaRN at s = 1024 / 128 = 8 and the report's alpha, beta and sqrt(t) rule;
               200 steps at pre-training's final learning rate, a few minutes on a CPU
               (`make extend`).
  tiny_noyarn  the tiny stage's control: the same training at 1,024 positions with the rope left
               as pre-trained (no interpolation), to show what YaRN adds.

The 671B stages accumulate 60 microbatches a step (config.train.grad_accum_steps): 32 sequences
of 32K, or 8 of 128K, at a time; `python -m dsv3_jax.plan` checks what a mesh holds.
"""

from dsv3_jax.train.run_config import base_config

# The report's YaRN constants (both stages) and its extension learning rate.
V3_YARN = dict(original_seq_len=4096, rope_factor=40.0, beta_slow=1.0, beta_fast=32.0, mscale=1.0)
V3_EXTENSION_LR = 7.3e-6
VARIANTS = ("32k", "128k", "tiny", "tiny_noyarn")


def get_config(arg: str = ""):
    if arg not in VARIANTS:
        raise ValueError(f"configs/extend.py: unknown variant {arg!r}; use one of "
                         f"{', '.join(VARIANTS)} (e.g. --config=configs/extend.py:tiny).")
    if arg in ("32k", "128k"):
        return _v3_stage(arg)
    return _tiny_stage(yarn=arg == "tiny")


def _constant_lr(c, lr: float) -> None:
    """A constant learning rate from the first step (the report gives no warm-up for these
    stages; the optimizer is fresh, its first steps are bias-corrected Adam steps)."""
    c.train.lr = lr
    c.train.warmup_steps = 0
    c.train.decay_start_fraction = 1.0
    c.train.final_lr_ratio = 1.0


def _v3_stage(stage: str):
    c = base_config("deepseek-v3-671b")
    seq_len, batch, accum = {"32k": (32768, 1920, 60), "128k": (131072, 480, 60)}[stage]
    for field, value in V3_YARN.items():
        c.model[field] = value
    c.model.max_seq_len = seq_len
    c.model.remat_policy = "full"
    c.data.seq_len = seq_len
    c.data.batch_size = batch
    c.train.grad_accum_steps = accum
    c.train.steps = 1000
    _constant_lr(c, V3_EXTENSION_LR)
    c.train.bf16_moments = True
    c.train.checkpoint_every = 100
    c.train.eval_every = 250
    c.train.eval_batches = 4
    c.train.log_every = 1
    c.mesh.expert = 64
    c.mesh.fsdp = -1
    # Stage 1 starts from the pre-training workdir, stage 2 from stage 1's: pass it with
    # --config.train.init_from=... (left empty, the stage would train from a random init).
    c.train.init_from = ""
    return c


def _tiny_stage(yarn: bool):
    c = base_config("tiny")
    c.model.max_seq_len = 1024
    if yarn:
        c.model.original_seq_len = 128  # the length the tiny run was trained at
        c.model.rope_factor = 1024 / 128
        c.model.beta_slow, c.model.beta_fast, c.model.mscale = 1.0, 32.0, 1.0
    c.data.seq_len = 1024
    c.data.batch_size = 4
    c.train.grad_accum_steps = 2
    c.train.steps = 200
    _constant_lr(c, 3e-4)  # configs/tiny.py's final learning rate (3e-3 x final_lr_ratio 0.1)
    c.train.init_from = "runs/tiny"  # the make train workdir
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    return c
