"""What a run reports: metrics.jsonl, TensorBoard, a progress bar, expert-load statistics, MFU.

`<workdir>/metrics.jsonl` gets one JSON object per logged step (`step`, `loss`, `lr`, `grad_norm`,
`tokens_per_sec`, `mfu`, the loss terms, per-layer expert-load statistics, and with
`train.log_expert_load` the per-expert `expert_load` and `router_bias` of every router) and one per evaluation
(`step`, `eval_loss`, `eval_perplexity`, `eval_accuracy`, `eval_mtp_accuracy`). The same scalars go
to TensorBoard under `<workdir>/tb`; per-layer lists become one scalar per layer.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import tqdm

from dsv3_jax.files import atomic_file

# bf16 dense peak FLOP/s per device, for MFU.
_PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("B200", 2250e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """The configured peak, else the known bf16 peak of `device_kind`, else None (e.g. CPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    for name, flops in _PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def expert_load_stats(load: np.ndarray, bias_norms: np.ndarray | None) -> dict:
    """Per MoE layer (rows of `load` [L, E]): max/mean load, coefficient of variation, bias norm."""
    load = np.asarray(load, np.float64)
    mean = np.maximum(load.mean(axis=1), 1e-9)
    stats = {"expert_load_max_over_mean": (load.max(axis=1) / mean).round(4).tolist(),
             "expert_load_cv": (load.std(axis=1) / mean).round(4).tolist()}
    if bias_norms is not None:
        stats["router_bias_norm"] = np.asarray(bias_norms, np.float64).round(6).tolist()
    return stats


def _step_of(line: str) -> float:
    """A metrics.jsonl row's step; inf for a blank line or one cut short (a killed run's last),
    so that it is dropped."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


class MetricsWriter:
    """metrics.jsonl + TensorBoard + a progress bar; only process 0 writes."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        import tensorboardX

        path = os.path.join(workdir, "metrics.jsonl")
        # Rows after start_step go: a resumed run redoes them, and a fresh one (start_step 0) drops
        # those of an earlier, checkpoint-less attempt.
        if os.path.exists(path):
            with open(path) as f:
                rows = [line for line in f if _step_of(line) <= start_step] if start_step else []
            with atomic_file(path, "w") as f:  # a crash here keeps the old file whole
                f.writelines(rows)
        self._jsonl = open(path, "a")
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                              dynamic_ncols=True)

    def write(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in row.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key == "step" or value is None:
                continue
            if not isinstance(value, list):
                self._tb.add_scalar(key, value, step)
            elif not (value and isinstance(value[0], list)):  # per-expert vectors: jsonl only
                for i, v in enumerate(value):
                    self._tb.add_scalar(f"{key}/layer_{i}", v, step)
        self._tb.flush()

    def progress(self, step: int, loss: float | None, tokens_per_sec: float,
                 **more: float) -> None:
        """Moves the bar to `step`, showing the loss (unless None), tokens/s and `more` (4
        significant digits each)."""
        if not self.enabled:
            return
        self._bar.n = step
        shown = {} if loss is None else {"loss": f"{loss:.4f}"}
        shown.update({k: f"{v:.4g}" for k, v in more.items()})
        self._bar.set_postfix(**shown, tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        """Closes the progress bar, metrics.jsonl and TensorBoard; closing again does nothing."""
        if self.enabled:
            self.enabled = False
            self._bar.close()
            self._jsonl.close()
            self._tb.close()


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    value = np.asarray(value)  # None: a 0-d object array, whose item() is None
    if value.ndim:
        return value.tolist()
    value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / Inf
    return value
