"""The GPU session's preparations, checked on the CPU: experiments/kernel_targets.py (the kernel
list for mosaic_ptxas_check.py) names every Mosaic GPU kernel of ops/pallas at both dim sets and
every target traces; experiments/gpu_check.py --dry-run runs every stage and writes its report."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PALLAS = ROOT / "dsv3_jax" / "ops" / "pallas"


def _experiment(name):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _kernel_modules():
    """The Mosaic GPU kernel modules: ops/pallas/*_sm90.py."""
    names = sorted(p.stem for p in PALLAS.glob("*_sm90.py"))
    assert len(names) >= 4, names
    return [importlib.import_module(f"dsv3_jax.ops.pallas.{n}") for n in names]


def _entry_points(module):
    """Public kernel entry points: functions in __all__ that take `interpret`."""
    return {n for n in module.__all__ if inspect.isfunction(getattr(module, n))
            and "interpret" in inspect.signature(getattr(module, n)).parameters}


def _kernel_bodies(module):
    """Kernel bodies (what plgpu.kernel runs), by name: module functions named *_kernel."""
    return {n for n, f in vars(module).items()
            if inspect.isfunction(f) and f.__module__ == module.__name__
            and (n == "_kernel" or n.endswith("_kernel"))}


def test_kernel_targets_cover_every_kernel_at_both_dim_sets(monkeypatch):
    """Every entry point and every kernel body of ops/pallas/*_sm90.py is reached by some target
    at V3 and at small dims: each target is traced (jax.eval_shape) with the bodies wrapped to
    record that they were traced. Also: make() is the tool's [(name, fn, args)] form, names are
    unique and end in their dim set, and KERNEL_TARGETS filters."""
    kt = _experiment("kernel_targets")
    seen: set = set()
    for module in _kernel_modules():
        for name in _kernel_bodies(module):
            body = getattr(module, name)

            @functools.wraps(body)
            def recording(*args, __body=body, __key=(module.__name__, name), **kwargs):
                seen.add(__key)
                return __body(*args, **kwargs)

            monkeypatch.setattr(module, name, recording)
    expected_bodies = {(m.__name__, n) for m in _kernel_modules() for n in _kernel_bodies(m)}
    expected_entries = {(m.__name__, n) for m in _kernel_modules() for n in _entry_points(m)}
    assert len(expected_bodies) >= 7 and len(expected_entries) >= 5

    for tag in kt.PRESETS:
        targets = kt.targets(tag)
        assert all(t.name.endswith(f"_{tag}") for t in targets)
        seen.clear()
        for t in targets:
            out = jax.eval_shape(t.fn, *t.args)
            assert jax.tree.leaves(out), t.name
        assert seen == expected_bodies, f"{tag}: bodies never traced: {expected_bodies - seen}"
        entries = {(t.kernel.__module__, t.kernel.__name__) for t in targets}
        assert entries == expected_entries, f"{tag}: entry points without a target: " \
                                            f"{expected_entries - entries}"

    everything = kt.make()
    names = [n for n, _, _ in everything]
    assert len(names) == len(set(names)) == sum(len(kt.targets(t)) for t in kt.PRESETS)
    assert all(callable(f) and all(isinstance(a, jax.ShapeDtypeStruct) for a in args)
               for _, f, args in everything)
    monkeypatch.setenv(kt.ENV_FILTER, "mla_bwd*, fp8_gemm_small")
    assert sorted(n for n, _, _ in kt.make()) == ["fp8_gemm_small", "mla_bwd_noseg_small",
                                                  "mla_bwd_noseg_v3", "mla_bwd_small",
                                                  "mla_bwd_v3"]
    monkeypatch.setenv(kt.ENV_FILTER, "no_such_kernel")
    with pytest.raises(ValueError, match="matches no target"):
        kt.make()


def test_kernel_targets_dims_follow_the_presets():
    import dsv3_jax as ds

    kt = _experiment("kernel_targets")
    v3 = ds.get_model_config("deepseek-v3-671b")
    by_name = {t.name: t for t in kt.targets("v3")}
    q, k, v, seg = by_name["mla_bwd_v3"].args
    assert q.shape[2:] == (v3.n_heads, v3.qk_nope_head_dim + v3.qk_rope_head_dim)
    assert v.shape[-1] == v3.v_head_dim
    assert by_name["gmm_w1_v3"].args[1].shape[1:] == (v3.dim, v3.moe_inter_dim)
    cache = by_name["mla_decode_b8_s32k_v3"].args[2]
    assert cache.shape == (8, 32768, v3.kv_lora_rank + v3.qk_rope_head_dim)
    wgrad = by_name["fp8_gemm_wgrad_v3"]
    assert wgrad.args[3].shape[0] == wgrad.args[2].shape[0]  # per-row b scales
    assert jax.eval_shape(wgrad.fn, *wgrad.args).dtype == jnp.float32
    small = {t.name: t for t in kt.targets("small")}
    assert small["mla_fwd_small"].args[0].shape[2] == ds.get_model_config("small").n_heads == 16
    with pytest.raises(ValueError, match="unknown dim set"):
        kt.targets("v2")


def test_one_target_lowers_for_h100():
    """The cheapest target through the sm_90a Mosaic GPU lowering (as mosaic_ptxas_check.py does
    before ptxas)."""
    kt = _experiment("kernel_targets")
    t = next(t for t in kt.targets("small") if t.name == "fp8_gemm_small")
    text = jax.jit(t.fn).trace(*t.args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_markdown_tables_are_parsed():
    gc = _experiment("gpu_check")
    text = "noise\nTitle line\n\n| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |\nafter\n"
    assert gc.markdown_tables(text) == [{"title": "Title line", "header": ["a", "b"],
                                         "rows": [["1", "x"], ["2", "y"]]}]
    summary, extra = gc._pytest_summary("FAILED tests/x.py::t - boom\n1 failed, 3 passed in 2s\n",
                                        None)
    assert extra["counts"] == {"failed": 1, "passed": 3}
    assert extra["failed"] == ["tests/x.py::t - boom"] and summary == "1 failed, 3 passed"


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_stage(tmp_path):
    """--dry-run on the CPU: every stage runs (kernels interpreted, tiny config) and the JSON and
    markdown name each stage with its status; the benchmarks' tables are parsed."""
    gc = _experiment("gpu_check")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_check.py"), "--dry-run",
                           f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=gc.DRY_BUDGET_S + 120)
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == [s.name for s in gc.STAGES], proc.stdout[-3000:]
    assert report["dry_run"] is True and report["env"]["backend"] == "cpu"
    for name, s in stages.items():
        assert s["status"] == "passed", (name, s["status"], s["summary"], s["tail"][-2000:])
        assert f"| {name} | passed |" in md
    assert proc.returncode == 0
    assert stages["pytest"]["counts"].get("skipped", 0) > 0  # no GPU here: the gpu tests skip
    for bench in ("bench_fp8_gemm", "bench_grouped_matmul", "bench_mla_attention",
                  "bench_mla_decode", "bench_decode"):
        assert stages[bench]["tables"] and stages[bench]["tables"][0]["rows"], bench
        assert "MISMATCH" not in json.dumps(stages[bench]["tables"]), bench
    assert len(stages["train"]["steps"]) == 2 and "tokens/s" in stages["train"]["summary"]
    assert "checks" in stages["safety_net"]
