"""The GRPO run config: the training run's sections (train/run_config.py) plus `config.rl`.

  config.rl    the task, rewards, sampling and the GRPO objective's settings (below)
  config.train steps (one per batch of prompts), optimizer, schedule, init_from (required: the
               SFT'd weights, which are also the frozen reference policy), checkpoints, eval_every,
               log_every, bias_gamma (the router-bias balance rule stays on), seed
  config.data  tokenizer only ("" takes init_from's); the corpus settings are not read
  config.model, config.mesh  as in training
"""

from __future__ import annotations

import ml_collections

from dsv3_jax.infer.sampling import Sampling
from dsv3_jax.rl.grpo import NORMALISATIONS
from dsv3_jax.train.run_config import (base_config, check_run_config, int_at_least, is_bool,
                                       model_config, number_in)

REWARD_POOLS = ("thread", "process")


def rl_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # "arithmetic" (generated word problems, dsv3_jax/rl/tasks.py) or a .jsonl of prompts
        # ({"prompt": ...} or {"messages": [...]}, plus the fields its rewards read).
        task="arithmetic",
        levels="1-3",  # the arithmetic task's difficulty levels: "1-3", "1,4", ... (of 1..5)
        eval_fraction=0.1,  # a JSONL task's share of held-out prompts
        # name=weight, ...: built-ins (exact_match, think_format) or module.function.
        rewards="exact_match=1.0,think_format=0.1",
        reward_pool="thread",  # "thread", or "process" for CPU-heavy checkers
        reward_workers=4,
        reward_timeout_s=10.0,  # a reward call still running then scores 0 and is counted
        prompts_per_step=8,  # P prompts per step
        samples_per_prompt=8,  # G, the group: at least 2
        max_new_tokens=64,  # the longest completion
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        speculative=False,  # draft with the first MTP module while sampling
        epochs=1,  # passes over each batch of samples (PPO epochs)
        minibatches=1,  # optimizer steps per pass (the samples split into this many)
        clip_low=0.2,  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
        clip_high=0.2,
        kl_beta=0.04,  # the k3 KL penalty's coefficient (DeepSeekMath's 0.04); 0 disables
        normalisation="token",  # "token" (every completion token weighs the same) | "sequence"
        eval_prompts=64,  # held-out prompts decoded greedily at each evaluation; 0 disables
        # and this many sampled completions of each (temperature / top_p / top_k above): the
        # held-out pass@1 at the sampling temperature (DeepSeek-R1's pass@1); 0: greedy only
        eval_samples=4,
        score_chunk_tokens=512,  # tokens per chunk of the log-prob head (a [chunk, V] buffer)
    ))


def grpo_base_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """base_config(preset) with config.rl and the RL run's training defaults: no weight decay
    (the updates are small and few), a constant learning rate after a short warm-up."""
    c = base_config(preset)
    c.rl = rl_defaults()
    c.train.weight_decay = 0.0
    c.train.lr = 1e-5
    c.train.warmup_steps = 0
    c.train.schedule = "warmup_constant_cosine"
    c.train.decay_start_fraction = 1.0
    c.train.steps = 200
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.train.log_every = 1
    c.data.seq_len = 2  # only sizes the parameters' initialisation; samples set their own length
    return c


def _choice(options):
    return lambda v: (v in options, f"one of {list(options)}")


def _str(what: str):
    return lambda v: (isinstance(v, str) and bool(v.strip()), f"a non-empty string ({what})")


_RL_RULES = {
    "task": _str("'arithmetic' or the path of a .jsonl of prompts"),
    "levels": lambda v: (isinstance(v, (str, int)) and not isinstance(v, bool),
                         "levels such as '1-3' or '1,4' (of 1..5)"),
    "eval_fraction": number_in(0, 1, low_open=True, high_open=True,
                               why="a JSONL task's held-out share"),
    "rewards": _str("name=weight,... of exact_match, think_format or module.function"),
    "reward_pool": _choice(REWARD_POOLS),
    "reward_workers": int_at_least(1, "reward calls running at once"),
    "reward_timeout_s": number_in(0, low_open=True, why="seconds a reward call may take"),
    "prompts_per_step": int_at_least(1, "prompts sampled per step"),
    "samples_per_prompt": int_at_least(2, "the group size G; GRPO's baseline is the group's "
                                          "mean reward, so one sample per prompt has none"),
    "max_new_tokens": int_at_least(1, "the longest completion"),
    "temperature": number_in(0, low_open=True,
                             why="sampling temperature; greedy samples would all be equal and "
                                 "give every group a zero advantage"),
    "top_p": number_in(0, 1, low_open=True, why="nucleus sampling's mass"),
    "top_k": int_at_least(0, "0 keeps every token"),
    "speculative": is_bool,
    "epochs": int_at_least(1, "passes over each batch of samples"),
    "minibatches": int_at_least(1, "optimizer steps per pass; it must divide "
                                   "prompts_per_step * samples_per_prompt"),
    "clip_low": number_in(0, 1, high_open=True, why="the ratio's lower clip is 1 - clip_low"),
    "clip_high": number_in(0, why="the ratio's upper clip is 1 + clip_high"),
    "kl_beta": number_in(0, why="the KL coefficient; 0 disables the penalty"),
    "normalisation": _choice(NORMALISATIONS),
    "eval_prompts": int_at_least(0, "held-out prompts per evaluation; 0 disables it"),
    "eval_samples": int_at_least(0, "sampled completions per held-out prompt; 0 evaluates "
                                    "greedily only"),
    "score_chunk_tokens": int_at_least(1, "tokens per chunk of the log-prob head"),
}


def check_grpo_config(config) -> None:
    """check_run_config against grpo_base_config, then config.rl's rules and how they combine
    with the model: one-line ValueErrors naming the setting, the value and the fix."""
    check_run_config(config, reference=grpo_base_config())
    rl = config.rl
    for key, rule in _RL_RULES.items():
        ok, what = rule(rl[key])
        if not ok:
            raise ValueError(f"config.rl.{key}={rl[key]!r} is invalid: it must be {what}.")
    samples = rl.prompts_per_step * rl.samples_per_prompt
    if samples % rl.minibatches:
        raise ValueError(f"config.rl.minibatches={rl.minibatches} does not divide the "
                         f"{samples} samples of a step (prompts_per_step {rl.prompts_per_step} x "
                         f"samples_per_prompt {rl.samples_per_prompt}); pick a divisor.")
    cfg = model_config(config)
    if rl.max_new_tokens >= cfg.max_seq_len:
        raise ValueError(f"config.rl.max_new_tokens={rl.max_new_tokens} leaves no room for a "
                         f"prompt in the model's context (max_seq_len={cfg.max_seq_len}); ask for "
                         f"at most {cfg.max_seq_len - 1}.")
    if rl.speculative and not cfg.mtp_depth:
        raise ValueError("config.rl.speculative=True needs an MTP module, but the model has "
                         "mtp_depth=0; set it False.")
    if not config.train.init_from:
        raise ValueError("config.train.init_from is empty: GRPO starts from trained (SFT'd) "
                         "weights, which are also its frozen reference policy; give a training "
                         "workdir, a converted Orbax folder or a Hugging Face folder.")


def sampling_of(rl) -> Sampling:
    return Sampling(temperature=float(rl.temperature), top_k=int(rl.top_k), top_p=float(rl.top_p))
