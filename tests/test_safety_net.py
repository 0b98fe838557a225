"""The safety net under the GPU kernels (ops/safety_net.py) on the CPU.

`platform.on_hopper` is made to say True, so "auto" dispatch picks the Mosaic GPU kernels and the
net checks them in GPU interpret mode. Kernels that raise or compute wrong numbers are stand-ins
(monkeypatched over the kernel module's function); a good kernel is the real FP8 GEMM at one tile,
or stand-ins computing the right numbers with lax where a test is about the net's plumbing (jit,
grad, the classes of a config) and the real kernels would take minutes in interpret mode.
Fallback results are compared exactly with the reference they are: the fallback *is* it.
Every verdict goes to a fresh DSV3_KERNEL_CACHE under tmp_path.
"""

from __future__ import annotations

import json
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.ops import attention, fp8, platform, safety_net
from dsv3_jax.ops import grouped_matmul as gm
from dsv3_jax.ops.pallas import fp8_gemm_sm90, grouped_matmul_sm90, mla_attention_sm90
from dsv3_jax.ops.pallas import mla_decode_sm90

from conftest import assert_close


@pytest.fixture(autouse=True)
def net(monkeypatch, tmp_path):
    """A Hopper GPU as far as dispatch can tell, no forcing, an empty cache in tmp_path."""
    for var in ("DSV3_ATTENTION", "DSV3_GROUPED_MATMUL", "DSV3_FP8_GEMM", "DSV3_KERNEL_CHECK",
                "DSV3_KERNEL_CHECK_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DSV3_KERNEL_CACHE", str(tmp_path / "verdicts"))
    monkeypatch.setattr(platform, "on_hopper", lambda: True)
    safety_net.clear()
    yield tmp_path / "verdicts"
    safety_net.clear()


def _bf16(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.bfloat16)


def _qkv(seed, t=128, a=64, o=64):
    return _bf16(seed, (1, t, 2, a)), _bf16(seed + 1, (1, t, 2, a)), _bf16(seed + 2, (1, t, 2, o))


def _net_warnings(record):
    return [str(w.message) for w in record if "dsv3_jax: GPU kernel" in str(w.message)]


class Calls:
    """Wraps a function, counting its calls (traced or not)."""

    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *args, **kwargs):
        self.n += 1
        return self.fn(*args, **kwargs)


def _raise(*args, **kwargs):
    raise ValueError("Mosaic GPU lowering failed: unsupported layout\n(a second line)")


def _attention_reference_kernel(q, k, v, *, scale, segment_ids=None, interpret=False):
    return attention.mla_attention_reference(q, k, v, scale=scale, segment_ids=segment_ids)


def _ragged_gmm(x, w, starts, *, transpose_rhs=False, out_dtype=None, interpret=False,
                num_sms=None):
    """A correct stand-in for grouped_matmul_sm90.gmm (starts from row 0)."""
    w = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
    out = jax.lax.ragged_dot(x, w, jnp.diff(starts), preferred_element_type=jnp.float32)
    return out.astype(out_dtype or x.dtype)


def _ragged_tgmm(x, dy, starts, *, out_dtype=jnp.float32, interpret=False, num_sms=None):
    return gm.transposed_grouped_matmul_reference(x, dy, jnp.diff(starts)).astype(out_dtype)


# ------------------------------------------------------------------------------------------------
# Bad kernels: skipped with one warning, the fallback runs
# ------------------------------------------------------------------------------------------------
def test_raising_kernel_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(mla_attention_sm90, "mla_attention", _raise)
    q, k, v = _qkv(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = attention.mla_attention(q, k, v, scale=0.125)
        out2 = jax.jit(lambda q: attention.mla_attention(q, k, v, scale=0.125))(q * 2)
    (message,) = _net_warnings(record)
    assert "mla_attention_sm90" in message and "DSV3_ATTENTION=sm90" in message
    assert "ValueError: Mosaic GPU lowering failed: unsupported layout" in message
    assert "second line" not in message and "DSV3_KERNEL_CHECK=off" in message
    np.testing.assert_array_equal(out, attention.mla_attention_reference(q, k, v, scale=0.125))
    np.testing.assert_array_equal(out2, attention.mla_attention_reference(q * 2, k, v, scale=0.125))
    (verdict,) = safety_net.verdicts()
    assert verdict == {"kernel": "mla_attention_sm90", "dims": "bfloat16 A=64 O=64", "ok": False,
                       "error": "ValueError: Mosaic GPU lowering failed: unsupported layout",
                       "source": "probe"}


def test_wrong_values_fall_back_with_one_warning(monkeypatch):
    """A decode kernel 3% off (beyond the 2^-6 tolerance): skipped, the reference runs."""
    wrong = Calls(lambda q_lat, q_pe, cache, pos, *, scale, interpret=False: 1.03
                  * attention.mla_decode_reference(q_lat, q_pe, cache, pos, scale=scale))
    monkeypatch.setattr(mla_decode_sm90, "mla_decode", wrong)
    q_lat, q_pe, cache = _bf16(1, (1, 1, 2, 128)), _bf16(2, (1, 1, 2, 64)), _bf16(3, (1, 64, 192))
    pos = jnp.asarray([[40]], jnp.int32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [attention.mla_decode(q_lat, q_pe, cache, pos, scale=0.1) for _ in range(2)]
    (message,) = _net_warnings(record)
    assert "mla_decode_sm90 [bfloat16 C=128 R=64]" in message and "DSV3_ATTENTION" in message
    assert "Mismatch: decode output: max |kernel - reference|" in message
    assert wrong.n == 1  # the probe only
    ref = attention.mla_decode_reference(q_lat, q_pe, cache, pos, scale=0.1)
    for out in outs:
        np.testing.assert_array_equal(out, ref)


def test_wrong_grouped_matmul_falls_back_to_tiled(monkeypatch):
    monkeypatch.setattr(grouped_matmul_sm90, "gmm",
                        lambda x, w, starts, **kw: _ragged_gmm(x, w, starts, **kw) + 1)
    x, w = _bf16(4, (40, 64)), _bf16(5, (2, 64, 64))
    sizes = jnp.asarray([10, 25], jnp.int32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = gm.grouped_matmul(x, w, sizes)
    (message,) = _net_warnings(record)
    assert "gmm_sm90 [bfloat16 K=64 N=64 out=bfloat16]" in message
    assert "DSV3_GROUPED_MATMUL=sm90" in message and "tiled" in message
    np.testing.assert_array_equal(out, gm.grouped_matmul(x, w, sizes, impl="tiled"))


# ------------------------------------------------------------------------------------------------
# A good kernel: used, its verdict kept
# ------------------------------------------------------------------------------------------------
def test_good_kernel_is_used_and_its_verdict_kept(net):
    """The real FP8 GEMM kernel (GPU interpret mode, one tile): passes its check, and dispatch
    runs it (bit for bit the kernel's own output)."""
    a_q, a_s = fp8.act_quant(jax.random.normal(jax.random.key(0), (64, 128)))
    b_q, b_s = fp8.weight_quant(jax.random.normal(jax.random.key(1), (64, 128)))
    out = fp8.fp8_gemm(a_q, a_s, b_q, b_s)
    np.testing.assert_array_equal(out, fp8_gemm_sm90.fp8_gemm(a_q, a_s, b_q, b_s, interpret=True))
    assert safety_net.verdicts() == [{"kernel": "fp8_gemm_sm90",
                                      "dims": "K=128 N=64 out=bfloat16 b_s=blocks", "ok": True,
                                      "error": None, "source": "probe"}]
    (on_disk,) = safety_net.disk_verdicts()
    assert on_disk["ok"] and on_disk["jax"] == jax.__version__ and on_disk["device"] == "cpu"
    assert safety_net.cache_dir() == net and len(list(net.glob("*.json"))) == 1


def _check(tmp_path, probe, source_text="v1"):
    src = tmp_path / "kernel_sm90.py"
    if not src.exists() or src.read_text() != source_text:
        src.write_text(source_text)
    return safety_net.Check("toy_sm90", "bfloat16 K=64", probe, (str(src),), "DSV3_TOY", "sm90",
                            "reference")


def test_verdict_cached_in_process_and_on_disk(monkeypatch, tmp_path, net):
    probe = Calls(lambda: None)
    check = _check(tmp_path, probe)
    assert safety_net.passes(check) and safety_net.passes(check) and probe.n == 1
    safety_net.clear()  # a fresh process: the disk verdict, no probe
    assert safety_net.passes(check) and probe.n == 1
    assert safety_net.verdicts()[0]["source"] == "disk"
    safety_net.clear()
    assert safety_net.passes(_check(tmp_path, probe, "v2")) and probe.n == 2  # source changed
    safety_net.clear()
    monkeypatch.setattr(platform, "versions", lambda: {"jax": "9.9.9", "jaxlib": "9.9.9"})
    assert safety_net.passes(_check(tmp_path, probe, "v2")) and probe.n == 3  # jax changed
    assert {r["jax"] for r in safety_net.disk_verdicts()} == {jax.__version__, "9.9.9"}


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, net):
    probe = Calls(lambda: None)
    safety_net.passes(_check(tmp_path, probe))
    (path,) = net.glob("*.json")
    for garbage in ('{"ok": tr', '["not a dict"]', '{"ok": "yes"}', ""):
        path.write_text(garbage)
        safety_net.clear()
        assert safety_net.passes(_check(tmp_path, probe))
        assert safety_net.verdicts()[0]["source"] == "probe"
        assert json.loads(path.read_text())["ok"] is True  # rewritten
    assert probe.n == 5


def test_a_hang_is_a_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV3_KERNEL_CHECK_TIMEOUT", "0.3")
    check = _check(tmp_path, lambda: time.sleep(3))
    with pytest.warns(RuntimeWarning, match=r"toy_sm90 \[bfloat16 K=64\] is skipped: no result "
                                            r"within 0.3 s .*DSV3_TOY=sm90 forces the kernel"):
        assert not safety_net.passes(check)


# ------------------------------------------------------------------------------------------------
# Switches
# ------------------------------------------------------------------------------------------------
def test_forcing_skips_the_probe(monkeypatch):
    kernel = Calls(_attention_reference_kernel)
    monkeypatch.setattr(mla_attention_sm90, "mla_attention", kernel)
    monkeypatch.setenv("DSV3_ATTENTION", "sm90")
    attention.mla_attention(*_qkv(6), scale=0.125)
    assert kernel.n == 1 and safety_net.verdicts() == []  # dispatch only, no check
    monkeypatch.setattr(mla_attention_sm90, "mla_attention", _raise)
    with pytest.raises(ValueError, match="lowering failed"):  # forced: nothing in between
        attention.mla_attention(*_qkv(6), scale=0.125)


def test_the_net_off_skips_the_probe(monkeypatch):
    wrong = Calls(lambda *a, **kw: 2 * _attention_reference_kernel(*a, **kw))
    monkeypatch.setattr(mla_attention_sm90, "mla_attention", wrong)
    monkeypatch.setenv("DSV3_KERNEL_CHECK", "off")
    q, k, v = _qkv(7)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = attention.mla_attention(q, k, v, scale=0.125)
    assert not _net_warnings(record) and safety_net.verdicts() == [] and wrong.n == 1
    np.testing.assert_array_equal(out, 2 * attention.mla_attention_reference(q, k, v, scale=0.125))
    monkeypatch.setenv("DSV3_KERNEL_CHECK", "maybe")
    with pytest.raises(ValueError, match="DSV3_KERNEL_CHECK='maybe'; use 'on' or 'off'"):
        attention.mla_attention(q, k, v, scale=0.125)


@pytest.mark.parametrize("version,bad", [(12079, False), (12080, True), (12090, True),
                                         (12091, False), (None, False)])
def test_known_bad_cuda_is_refused_up_front(monkeypatch, version, bad):
    """CUDA 12.8.0 .. 12.9.0 (ptxas miscompiles causal masks): the causal kernels are refused
    before any probe, with the warning; forcing still runs them."""
    monkeypatch.setattr(platform, "cuda_runtime_version", lambda: version)
    assert (platform.causal_ptxas_bug() is not None) == bad
    kernel = Calls(_attention_reference_kernel)
    monkeypatch.setattr(mla_attention_sm90, "mla_attention", kernel)
    q, k, v = _qkv(8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = attention.mla_attention(q, k, v, scale=0.125)
    np.testing.assert_array_equal(out, attention.mla_attention_reference(q, k, v, scale=0.125))
    if bad:
        (message,) = _net_warnings(record)
        assert "ptxas miscompiles causal masking" in message and "DSV3_ATTENTION=sm90" in message
        assert kernel.n == 0 and safety_net.verdicts()[0]["source"] == "refused"
        monkeypatch.setenv("DSV3_ATTENTION", "sm90")
        attention.mla_attention(q, k, v, scale=0.125)
        assert kernel.n == 1
    else:
        assert not _net_warnings(record) and kernel.n == 2  # the probe, then dispatch


# ------------------------------------------------------------------------------------------------
# Dispatch inside jit and grad: the probe runs outside the caller's trace
# ------------------------------------------------------------------------------------------------
def test_inside_jit_of_jit_and_grad(monkeypatch):
    gmm, tgmm = Calls(_ragged_gmm), Calls(_ragged_tgmm)
    monkeypatch.setattr(grouped_matmul_sm90, "gmm", gmm)
    monkeypatch.setattr(grouped_matmul_sm90, "tgmm", tgmm)
    monkeypatch.setattr(mla_attention_sm90, "mla_attention", _raise)
    x, w, dy = _bf16(9, (40, 64)), _bf16(10, (2, 64, 128)), _bf16(11, (40, 128))
    sizes = jnp.asarray([12, 20], jnp.int32)
    q, k, v = _qkv(12)

    def loss(x, w, q, impl="auto"):
        y = gm.grouped_matmul(x, w, sizes, impl=impl)
        o = attention.mla_attention(q, k, v, scale=0.125) if impl == "auto" else \
            attention.mla_attention_reference(q, k, v, scale=0.125)
        return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(o.astype(jnp.float32) ** 2)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = jax.jit(jax.jit(jax.grad(loss, argnums=(0, 1, 2))))(x, w, q)
    want = jax.grad(lambda *a: loss(*a, impl="ragged_dot"), argnums=(0, 1, 2))(x, w, q)
    for g, r, name in zip(got, want, ("dx", "dw", "dq")):
        assert_close(g, r, 2.0 ** -7, name)  # one bf16 rounding apart at most
    assert {(v["kernel"], v["dims"], v["ok"]) for v in safety_net.verdicts()} == {
        ("gmm_sm90", "bfloat16 K=64 N=128 out=bfloat16", True),
        ("gmm_sm90", "bfloat16 K=128 N=64 transpose_rhs out=bfloat16", True),
        ("tgmm_sm90", "bfloat16 K=64 N=128 out=bfloat16", True),
        ("mla_attention_sm90", "bfloat16 A=64 O=64", False)}
    assert len(_net_warnings(record)) == 1
    assert gmm.n == 4 and tgmm.n == 2  # a probe and the dispatch each: the kernels were used


# ------------------------------------------------------------------------------------------------
# check_model_kernels
# ------------------------------------------------------------------------------------------------
def test_check_model_kernels_lists_the_classes_of_a_config(monkeypatch):
    monkeypatch.setattr(grouped_matmul_sm90, "gmm", _ragged_gmm)
    monkeypatch.setattr(grouped_matmul_sm90, "tgmm", _ragged_tgmm)
    monkeypatch.setattr(fp8_gemm_sm90, "fp8_gemm", lambda *a, out_dtype, **kw:
                        fp8.fp8_gemm_reference(*a, out_dtype=out_dtype))
    tiny = ds.get_model_config("tiny")  # attention dims the kernels do not take: no classes there
    got = safety_net.check_model_kernels(tiny)
    assert [(v["kernel"], v["dims"], v["ok"]) for v in got] == [
        ("gmm_sm90", "bfloat16 K=128 N=64 out=bfloat16", True),
        ("gmm_sm90", "bfloat16 K=128 N=64 transpose_rhs out=bfloat16", True),
        ("gmm_sm90", "bfloat16 K=64 N=128 out=bfloat16", True),
        ("gmm_sm90", "bfloat16 K=64 N=128 transpose_rhs out=bfloat16", True),
        ("tgmm_sm90", "bfloat16 K=128 N=64 out=bfloat16", True),
        ("tgmm_sm90", "bfloat16 K=64 N=128 out=bfloat16", True)]
    assert all(v["source"] == "probe" for v in got)
    safety_net.clear()
    assert {v["source"] for v in safety_net.check_model_kernels(tiny)} == {"disk"}
    # With cfg.fp8 the routed experts leave gmm for ops.fp8's grouped path, and the projections'
    # FP8 GEMM classes come in (listed here without running their probes: 15 classes, 84 s in
    # interpret mode).
    # wq_a 128->96, wq_b 96->192, wkv_a 128->80, wkv_b 64->256, wo 128->128, the dense MLP
    # 128->384->128, the shared expert 128->64->128, eh_proj 256->128; Fprop and Dgrad each.
    fp8_tiny = tiny.replace(fp8=True)
    assert gm.model_checks(fp8_tiny) == []
    pairs = [(128, 96), (96, 192), (128, 80), (64, 256), (128, 128), (128, 384), (384, 128),
             (128, 64), (64, 128), (256, 128)]
    want = {f"K={k} N={n} out=bfloat16 b_s=blocks" for i, j in pairs for k, n in ((i, j), (j, i))}
    checks = fp8.model_checks(fp8_tiny)
    assert {c.dims for c in checks} == want and len(checks) == len(want)
    assert {c.kernel for c in checks} == {"fp8_gemm_sm90"}


def test_elementwise_compare_has_a_floor_for_outputs_near_zero():
    """The FP8 probe once failed on one bf16 ulp (9.5e-7) at an output of 1.2e-4 beside outputs of
    45, against 2^-8 of |reference|: one ulp is up to 2^-7. Closer to zero, cancellation makes the
    fp32 summation order a larger relative change (4 ulps here), which the floor covers; a 1%
    error anywhere still fails."""
    want = np.array([45.2, -3.0, 2.0 ** -13])
    one_ulp = want + np.array([0.0, 0.0, 2.0 ** -20])
    safety_net.compare("x", one_ulp, want, fp8.KERNEL_ULP, elementwise=True)
    four_ulps = want + np.array([0.0, 0.0, 2.0 ** -18])
    with pytest.raises(safety_net.Mismatch, match=r"exceeds 0.00781 x \|reference\| \+ 0 x"):
        safety_net.compare("x", four_ulps, want, fp8.KERNEL_ULP, elementwise=True)
    safety_net.compare("x", four_ulps, want, fp8.KERNEL_ULP, elementwise=True,
                       floor=fp8.KERNEL_FLOOR)
    for i in range(3):
        wrong = want.copy()
        wrong[i] += 0.01 * 45.2
        with pytest.raises(safety_net.Mismatch, match=r"max \|kernel - reference\|"):
            safety_net.compare("x", wrong, want, fp8.KERNEL_ULP, elementwise=True,
                               floor=fp8.KERNEL_FLOOR)
