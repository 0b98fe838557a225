"""The one place that reads the machine: what the ops dispatchers need to know about it, and the
`DSV3_*` environment variables that force an implementation. Kernels read nothing: a dispatcher
asks here and passes them what they need (interpret mode, the SM count) as arguments.

It also holds what the safety net under the GPU kernels (ops/safety_net.py) asks of the machine:
the device kind and jax versions its verdicts hold for, the CUDA runtime (known-bad toolchains),
and its own switches DSV3_KERNEL_CHECK=on|off, DSV3_KERNEL_CHECK_TIMEOUT (seconds) and
DSV3_KERNEL_CACHE (the verdicts' folder).

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


def tpu_interpret() -> bool:
    """Whether a Mosaic TPU kernel runs in TPU interpret mode here: anywhere but on a TPU."""
    return not on_tpu()


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


def on_gpu() -> bool:
    """True when the default device is a GPU (any NVIDIA GPU: cuDNN runs there)."""
    return jax.devices()[0].platform == "gpu"


def device_kind() -> str:
    """The default device's kind, e.g. "NVIDIA H100 80GB HBM3" or "cpu" (keys kernel verdicts)."""
    return str(jax.devices()[0].device_kind)


def versions() -> dict[str, str]:
    """{"jax": ..., "jaxlib": ...}: the versions a kernel verdict holds for."""
    import jaxlib.version

    return {"jax": jax.__version__, "jaxlib": jaxlib.version.__version__}


def cuda_runtime_version() -> int | None:
    """The CUDA runtime version jaxlib reports (1000 major + 10 minor + patch, e.g. 12080 for
    12.8.0), or None off a CUDA build or when it does not say. Mosaic GPU compiles through the
    ptxas of this toolkit."""
    if not on_gpu():
        return None
    try:
        from jax._src.lib import cuda_versions
        return int(cuda_versions.cuda_runtime_get_version()) if cuda_versions else None
    except Exception:  # a jaxlib without the CUDA plugin's version query
        return None


# CUDA 12.8.0 .. 12.9.0: ptxas miscompiles causal masking in Mosaic GPU attention kernels (jax's own
# `jax.experimental.pallas.ops.gpu.attention_mgpu` refuses causal attention on these, >= 12080 and
# < 12091, and so do the dispatchers for our causal kernels).
PTXAS_CAUSAL_MISCOMPILE = (12080, 12091)


def causal_ptxas_bug() -> str | None:
    """Why causal Mosaic GPU kernels must not run on this toolchain, or None when they may."""
    version = cuda_runtime_version()
    lo, hi = PTXAS_CAUSAL_MISCOMPILE
    if version is None or not lo <= version < hi:
        return None
    return (f"CUDA runtime {version // 1000}.{version % 1000 // 10}.{version % 10}: its ptxas "
            "miscompiles causal masking in Mosaic GPU kernels (12.8.0 to 12.9.0; jax's "
            "attention_mgpu refuses them too); upgrade to CUDA 12.9.1 or later")


_CHECK_VALUES = ("on", "off")


def kernel_check() -> bool:
    """Whether a GPU kernel chosen by "auto" dispatch is first checked against its reference
    (ops/safety_net.py): DSV3_KERNEL_CHECK=on (default) or off. Read at trace time."""
    value = os.environ.get("DSV3_KERNEL_CHECK", "on")
    if value not in _CHECK_VALUES:
        raise ValueError(f"DSV3_KERNEL_CHECK={value!r}; use 'on' or 'off' (or leave it unset).")
    return value == "on"


def kernel_check_timeout() -> float:
    """Seconds one first-use check may take before it counts as a hang (DSV3_KERNEL_CHECK_TIMEOUT,
    default 300: a kernel compiles in seconds on a GPU; GPU interpret mode on a CPU is slower)."""
    value = os.environ.get("DSV3_KERNEL_CHECK_TIMEOUT", "300")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"DSV3_KERNEL_CHECK_TIMEOUT={value!r}; use a positive number of seconds.")
    return seconds


def kernel_cache_dir() -> str:
    """Where kernel verdicts are kept on disk: DSV3_KERNEL_CACHE, else
    ~/.cache/dsv3_jax/kernel_verdicts."""
    return os.path.expanduser(os.environ.get("DSV3_KERNEL_CACHE")
                              or os.path.join("~", ".cache", "dsv3_jax", "kernel_verdicts"))
