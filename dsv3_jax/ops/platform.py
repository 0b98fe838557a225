"""The one place that reads the machine: what the ops dispatchers need to know about it, and the
`DSV3_*` environment variables that force an implementation. Kernels read nothing: a dispatcher
asks here and passes them what they need (interpret mode, the SM count) as arguments.

Everything here is read at trace time: a function already traced (jit's cache in this process, a
lowered or exported program) keeps the choice made then; setting a `DSV3_*` variable later changes
only what is traced after that.
"""

from __future__ import annotations

import os

import jax


def on_hopper() -> bool:
    """True when the default device is an NVIDIA GPU of compute capability 9.x (H100 / H200)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def on_tpu() -> bool:
    return jax.devices()[0].platform == "tpu"


def gpu_interpret() -> bool:
    """Whether a Mosaic GPU kernel runs in GPU interpret mode here: anywhere but on a GPU."""
    return jax.devices()[0].platform != "gpu"


def num_sms() -> int | None:
    """The default GPU's SM count (132 on an H100 SXM); None off a GPU or when it does not say."""
    device = jax.devices()[0]
    sms = getattr(device, "core_count", 0) if device.platform == "gpu" else 0
    return int(sms) if sms else None


def forced_impl(variable: str, impls: tuple[str, ...]) -> str | None:
    """The implementation the environment variable `variable` forces, or None when it is unset or
    "auto" (read at trace time). A value outside `impls` is refused with the valid ones."""
    forced = os.environ.get(variable, "auto")
    if forced not in impls:
        raise ValueError(f"{variable}={forced!r}; use one of {impls} (or leave it unset).")
    return None if forced == "auto" else forced
