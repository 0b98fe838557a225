"""What the ops dispatchers need to know about the machine: the one definition of "a Hopper GPU",
and the environment variables that force an implementation.

Each op module keeps its own choice (`ops/fp8.gemm_impl`, `ops/grouped_matmul.grouped_matmul_impl`,
`ops/attention.attention_impl`); they read the machine and the overrides through these two helpers.
"""

from __future__ import annotations

import os

import jax


def on_hopper() -> bool:
    """True when the default device is an NVIDIA GPU of compute capability 9.x (H100 / H200)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def forced_impl(variable: str, impls: tuple[str, ...]) -> str | None:
    """The implementation the environment variable `variable` forces, or None when it is unset or
    "auto". A value outside `impls` is refused with the valid ones."""
    forced = os.environ.get(variable, "auto")
    if forced not in impls:
        raise ValueError(f"{variable}={forced!r}; use one of {impls} (or leave it unset).")
    return None if forced == "auto" else forced
