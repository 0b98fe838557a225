"""`dsv3_jax.plan` against XLA: the plan's per-device total and the compiled train step's own
figure (arguments + outputs + temporaries - aliased) agree within 25%, for the tiny and small
configs on 8 simulated devices, under meshes with and without the expert exchange."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytestmark = pytest.mark.multidevice

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(name: str, seq_len: int):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("")
    # Sequence 256: attention and the loss are a real share of the total, and a compile takes
    # about 20 s on one core.
    c.data.seq_len = seq_len
    c.model.max_seq_len = max(c.model.max_seq_len or 0, seq_len)
    return c


# (config, mesh, sequences per device): each mesh splits the batch 8 ways; the expert ones run
# the expert exchange with P > 1, the tensor one splits heads, hidden dims and vocabulary.
CASES = [("tiny", "fsdp=8", 2), ("tiny", "expert=2,tensor=2,fsdp=2", 2),
         ("small", "fsdp=8", 1), ("small", "expert=4,fsdp=2", 1)]


@pytest.mark.parametrize("name,mesh,per_device_batch", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_plan_total_matches_xla(name, mesh, per_device_batch):
    import jax

    from dsv3_jax.plan import compiled_bytes, parse_mesh, plan

    if len(jax.devices("cpu")) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    config = _config(name, 256)
    p = plan(config, 8, parse_mesh(mesh, None), per_device_batch, attention="reference")
    xla = compiled_bytes(config, p)
    assert xla > 0
    ratio = p.total_bytes / xla
    print(f"{name} {mesh}: plan {p.total_bytes / 2**20:.1f} MiB, XLA {xla / 2**20:.1f} MiB, "
          f"plan / XLA {ratio:.3f}")
    assert 0.75 <= ratio <= 1.25, (p.bytes, xla)
