"""DeepSeek-V3 model: MLA, DeepSeekMoE, MTP as Flax Linen modules.

Notation: the one letter legend of the whole package. Every shape comment (`[B, T, D]`) and every
einsum (written in lowercase, `"btd,dhn->bthn"`) in `dsv3_jax` uses these letters with these
meanings and no others; a file's docstring may name the letters it uses but never redefines one.

  B  batch (sequences, prompts)
  T  positions being computed (query positions, tokens of a step)
  S  key positions, or KV-cache slots
  U  tokens of a flattened batch (B * T, or the share of one device)
  L  layers in a stack
  D  model dim (`dim`)
  H  attention heads (`n_heads`)
  N  qk nope head dim (`qk_nope_head_dim`, 128)
  R  qk rope head dim (`qk_rope_head_dim`, 64); R/2 rotation pairs
  A  qk head dim, N + R (`qk_head_dim`, 192)
  O  v head dim (`v_head_dim`, 128)
  C  kv latent rank (`kv_lora_rank`, 512); C + R is one latent-cache row
  Q  q latent rank (`q_lora_rank`, 1536)
  F  hidden dim of a SwiGLU (`inter_dim` dense, `moe_inter_dim` per expert)
  E  routed experts (`n_routed_experts`; E_loc held by one device)
  G  expert groups of the router (`n_expert_groups`)
  K  routed experts chosen per token (`n_activated_experts`, top-k)
  M  rows of a matmul (tokens, or token-expert pairs sorted by expert in a grouped matmul)
  I  input (contracted) dim of a matmul
  J  output dim of a matmul
  V  vocabulary (`vocab_size`)
  X  MTP depth (`mtp_depth` modules)
  P  devices on the mesh's `expert` axis
"""
