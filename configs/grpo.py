"""GRPO with verifiable rewards (DeepSeek-V3 report, section 5.2; dsv3_jax/rl/):

    python -m dsv3_jax.rl --config=configs/grpo.py --workdir=runs/tiny_rl \
        --config.train.init_from=runs/tiny_arith_sft

Variants (`--config=configs/grpo.py:<variant>`):
  (none)  the tiny model after `make grpo`'s SFT on the arithmetic task (init_from
          runs/tiny_arith_sft), on level 1 (where it starts near 45%, so most groups hold both
          right and wrong answers): 32 prompts x 8 samples per step at lr 5e-5 (at 8 prompts a
          step's update is mostly noise: the held-out score did not rise), 48 new tokens, 128
          held-out prompts, 250 steps: about 40 minutes on a 2-core CPU (`make grpo`).
  v3      the 671B model: DeepSeekMath's settings (lr 1e-6, KL beta 0.04, G = 16 of 64 prompts
          here; the report gives no batch sizes for V3's RL); set init_from to the SFT weights.
"""

from dsv3_jax.rl.config import grpo_base_config

VARIANTS = ("", "v3")


def get_config(arg: str = ""):
    if arg not in VARIANTS:
        raise ValueError(f"configs/grpo.py: unknown variant {arg!r}; use '' (the tiny model) or "
                         "'v3' (e.g. --config=configs/grpo.py:v3).")
    if arg == "v3":
        c = grpo_base_config("deepseek-v3-671b")
        c.rl.prompts_per_step = 64
        c.rl.samples_per_prompt = 16
        c.rl.max_new_tokens = 4096
        c.rl.minibatches = 4
        c.train.lr = 1e-6
        c.train.steps = 1000
        c.train.bf16_moments = True
        c.model.remat_policy = "full"
        c.mesh.expert = 64
        c.mesh.fsdp = -1
        c.train.init_from = ""  # the SFT weights: --config.train.init_from=...
        return c
    c = grpo_base_config("tiny")
    c.rl.levels = "1"
    c.rl.prompts_per_step = 32
    c.rl.samples_per_prompt = 8
    c.rl.max_new_tokens = 48
    c.rl.eval_prompts = 128
    c.train.lr = 5e-5
    c.train.steps = 250
    c.train.eval_every = 25
    c.train.checkpoint_every = 25
    c.train.init_from = "runs/tiny_arith_sft"  # make grpo's SFT workdir
    return c
