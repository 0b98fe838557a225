"""Sharded training on 8 simulated CPU devices, and across 2 processes.

These tests need 8 devices: `make test` runs them in a second pytest with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (elsewhere they are skipped).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import sysconfig

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsv3_jax.model.transformer import DeepSeekV3
from dsv3_jax.parallel.mesh import LOGICAL_AXIS_RULES, batch_sharding, make_mesh

from conftest import COMPILATION_CACHE, TINY32, assert_close, init_params, jitted_loss_grad, random_tokens

pytestmark = pytest.mark.multidevice
ROOT = pathlib.Path(__file__).resolve().parent.parent
MESHES = [dict(data=2, fsdp=2, expert=2, tensor=1), dict(data=1, fsdp=1, expert=4, tensor=2),
          dict(data=1, fsdp=4, expert=1, tensor=2)]


def _mesh(**sizes):
    n = int(np.prod(list(sizes.values())))
    return make_mesh(ml_collections.ConfigDict(sizes), devices=jax.devices()[:n])


def _shardings(cfg, mesh):
    boxed = jax.eval_shape(lambda: DeepSeekV3(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_AXIS_RULES)


@pytest.mark.parametrize("sizes", MESHES, ids=["data2-fsdp2-expert2", "expert4-tensor2", "fsdp4-tensor2"])
def test_sharded_gradients_equal_the_single_device_ones(sizes):
    """Loss gradients (CE + MTP + balance loss) of the fp32 tiny model: expert-parallel MoE,
    tensor-parallel heads and FFNs, FSDP weights, against one device. The sums run in another order
    across devices; fp32 rounding stays near 1e-6 of each gradient's scale, the bound is 1e-5."""
    cfg = TINY32
    params, tokens = init_params(cfg), random_tokens(cfg, (8, 16), seed=1)
    reference = jitted_loss_grad(cfg)(params, tokens)
    mesh = _mesh(**sizes)
    sharded = jax.device_put(params, _shardings(cfg, mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        grads = jitted_loss_grad(cfg)(sharded, jax.device_put(tokens, batch_sharding(mesh)))
    jax.tree.map(lambda g, r: assert_close(g, r, 1e-5, str(sizes)), grads, reference)
    # The routed experts really are split as the rules table says: E / expert, F / tensor.
    w1 = sharded["moe_layers"]["layers"]["ffn"]["w1"]  # [L, E, D, F]
    assert w1.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    assert w1.addressable_shards[0].data.shape == (
        2, 8 // sizes["expert"], cfg.dim // sizes["fsdp"], cfg.moe_inter_dim // sizes["tensor"])


def test_fp8_sharded_gradients_match_the_single_device_ones():
    """config.model.fp8 on data2 x fsdp2 x expert2: every Linear (parallel/kernel_shards.py) and the
    routed experts (the expert-parallel shard_map) run their FP8 GEMMs per device, on the rows that
    device holds. Fprop and Dgrad quantize 1x128 tiles along the features, the same on any number
    of devices; Wgrad quantizes 128-row tiles along the tokens, which restart at each device's rows
    (16 here, a whole tile on one device): two quantizations of one product, each ~7e-4 from the
    exact one, so up to ~1.4e-3 apart, and the difference travels down the chain of FP8 GEMMs. The
    bound is on calc_diff of all gradients together, and of the experts' w1 (measured 5.5e-4 and
    4.8e-4); a wrong tile or scale, or a weight gradient not summed over the batch shards, gives
    calc_diff of order 1e-2 to 1 (> 0.3 for w1 not summed over the 4 batch shards)."""
    from dsv3_jax.ops.fp8 import calc_diff

    cfg = TINY32.replace(fp8=True)
    params, tokens = init_params(cfg), random_tokens(cfg, (8, 16), seed=1)
    reference = jitted_loss_grad(cfg)(params, tokens)
    mesh = _mesh(data=2, fsdp=2, expert=2, tensor=1)
    sharded = jax.device_put(params, _shardings(cfg, mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        grads = jitted_loss_grad(cfg)(sharded, jax.device_put(tokens, batch_sharding(mesh)))
    w1 = lambda t: np.asarray(t["moe_layers"]["layers"]["ffn"]["w1"], np.float64)
    flat = lambda t: np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(t)])
    assert np.all(np.isfinite(flat(grads)))
    assert calc_diff(flat(grads), flat(reference)) < 3e-3
    assert calc_diff(w1(grads), w1(reference)) < 3e-3


def test_accumulated_sharded_gradients_equal_one_sharded_step():
    """config.train.grad_accum_steps=2 on data2 x fsdp2 x expert2 (a batch of 16: 2 rows per
    device, 1 per microbatch): microbatches keep each device's rows, and the step's loss, expert
    load and gradients are those of one step over the whole batch on the same mesh (the bound of
    tests/test_grad_accum.py, 1e-6 of the gradients' norm; the forward pass of a 1-row shard
    rounds differently from a 2-row one)."""
    import functools

    from test_grad_accum import _relative, _train_cfg, mixed_batch
    from dsv3_jax.train import loop

    cfg = TINY32
    params, batch = init_params(cfg), mixed_batch(cfg, 16, 16, seed=5)
    mesh = _mesh(data=2, fsdp=2, expert=2, tensor=1)
    sharded = jax.device_put(params, _shardings(cfg, mesh))
    batch = jax.device_put(batch, batch_sharding(mesh))
    results = []
    for accum in (1, 2):
        fn = jax.jit(functools.partial(loop._loss_and_grads, model=DeepSeekV3(cfg),
                                       train_cfg=_train_cfg(accum), chunk_tokens=64))
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            results.append(jax.device_get(fn(sharded, batch)))
    ((loss1, aux1), g1), ((loss2, aux2), g2) = results
    assert_close(loss2, loss1, 1e-6, "loss")
    np.testing.assert_array_equal(aux2[1], aux1[1])  # expert loads
    assert _relative(g2, g1) <= 1e-6


def test_params_are_sharded_as_the_table_says_and_shrink_per_device():
    cfg = TINY32
    params = init_params(cfg)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = {}
    for n in (1, 2, 4, 8):
        mesh = _mesh(data=1, fsdp=n, expert=1, tensor=1)
        sharded = jax.device_put(params, _shardings(cfg, mesh))
        device = jax.devices()[0]
        per_device[n] = sum(s.data.nbytes for x in jax.tree.leaves(sharded)
                            for s in x.addressable_shards if s.device == device)
        spec = sharded["moe_layers"]["layers"]["attn"]["wq_b"]["kernel"].sharding.spec
        # ("layers", "q_lora", "heads") and ("vocab", "embed"), as the rules table maps them.
        assert spec == jax.sharding.PartitionSpec(None, "fsdp", ("tensor", "expert"))
        assert sharded["embed"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(
            "tensor", ("fsdp", "expert"))
    assert per_device[1] == total
    for n in (2, 4, 8):
        # 1/N, up to the small replicated leaves (norm weights of the model dim, router biases).
        assert per_device[n] <= total / n * 1.05, (n, per_device[n], total / n)
    mesh = _mesh(data=1, fsdp=1, expert=4, tensor=2)
    sharded = jax.device_put(params, _shardings(cfg, mesh))
    w1 = sharded["moe_layers"]["layers"]["ffn"]["w1"]  # [L, E, D, F] over (-, expert, -, tensor)
    assert w1.addressable_shards[0].data.shape == (2, 8 // 4, cfg.dim, cfg.moe_inter_dim // 2)


# ------------------------------------------------------------------------- training runs

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _corpus(root: pathlib.Path) -> str:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email"):
        for f in sorted((stdlib / package).glob("*.py")):
            shutil.copy(f, root / f"{package}_{f.name}")
    return str(root / "*.py")


def _settings(corpus: str, steps: int) -> dict:
    """A small fp32 run on the expert4 x tensor2 mesh, evaluation off to keep compiles few.
    Dropless: with a bounded exchange a routing near-tie that the two layouts' summation orders
    break differently can move a pair across its peer's capacity, a larger change than rounding."""
    return {"data.corpus": corpus, "data.seq_len": 32, "data.batch_size": 8,
            "data.validation_fraction": 0.2, "model.vocab_size": 512, "model.dtype": "float32",
            "model.n_layers": 2, "model.moe_capacity_factor": 0.0, "train.steps": steps,
            "train.checkpoint_every": 2, "train.log_every": 1, "train.eval_batches": 0, "train.lr": 3e-3,
            "train.warmup_steps": 1, "train.async_checkpoint": False,
            "mesh.data": 1, "mesh.fsdp": 1, "mesh.expert": 4, "mesh.tensor": 2}


def _two_processes(workdir: pathlib.Path, corpus: str, steps: int, log_dir: pathlib.Path) -> None:
    port = _free_port()
    flags = [f"--config.{k}={v}" for k, v in _settings(corpus, steps).items()]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    procs = []
    for i in range(2):
        log = open(log_dir / f"process{i}_{steps}.txt", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dsv3_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}:smoke",
             f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
             "--num_processes=2", f"--process_id={i}", *flags],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    for i, p in enumerate(procs):
        code = p.wait(timeout=900)
        assert code == 0, (log_dir / f"process{i}_{steps}.txt").read_text()[-4000:]


def _losses(workdir) -> dict:
    with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_two_processes_train_save_restore_and_match_one_process(tmp_path):
    """2 processes x 4 CPU devices (gloo collectives) train 2 steps and save; a restart of both
    restores and trains to step 4; losses and parameters match one process with 8 devices."""
    from dsv3_jax.train.checkpoint import read_params
    from dsv3_jax.train.loop import train_and_evaluate
    from dsv3_jax.train.run_config import base_config

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    corpus = _corpus(corpus_dir)
    multi = tmp_path / "multi"
    _two_processes(multi, corpus, 2, tmp_path)
    assert sorted(os.listdir(multi / "checkpoints")) == ["2"]
    _two_processes(multi, corpus, 4, tmp_path)  # resumes from step 2

    config = base_config("tiny")
    with config.unlocked():
        for key, value in _settings(corpus, 4).items():
            section, name = key.split(".")
            config[section][name] = value
    single = tmp_path / "single"
    train_and_evaluate(config, str(single))

    a, b = _losses(multi), _losses(single)
    assert sorted(a) == [1, 2, 3, 4]
    np.testing.assert_allclose([a[s] for s in range(1, 5)], [b[s] for s in range(1, 5)], rtol=1e-5)
    (_, params_multi, _), (_, params_single, _) = read_params(str(multi)), read_params(str(single))
    # Adam divides by sqrt(v): where a gradient is ~0 (embedding rows of tokens absent from the
    # batch), summation-order noise moves a weight by a fraction of lr. Bound: 1e-3 x lr per step
    # (seen: 9e-7 after 4 steps); a wrong shard or a lost update would move weights by ~lr.
    bound = 1e-3 * 3e-3 * 4
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params_multi)[0],
                            jax.tree.leaves(params_single)):
        diff = float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        assert diff <= bound, (jax.tree_util.keystr(path), diff)
