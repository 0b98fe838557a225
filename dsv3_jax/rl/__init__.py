"""Reinforcement learning after SFT: GRPO with verifiable rewards (DeepSeek-V3 report, section 5.2;
GRPO from DeepSeekMath).

  python -m dsv3_jax.rl --config=configs/grpo.py --workdir=runs/tiny_rl \
      --config.train.init_from=runs/tiny_arith_sft

  grpo.py     group advantages and the clipped, KL-regularised GRPO loss (the math)
  rewards.py  reward functions (prompt, completion, **fields) -> float and their worker pool
  tasks.py    where prompts come from: the built-in arithmetic task, or JSONL prompts
  sft_data.py the arithmetic task's conversations for SFT (the format GRPO then rewards)
  loop.py     train_grpo(config, workdir): sample -> reward -> advantages -> updates
"""
