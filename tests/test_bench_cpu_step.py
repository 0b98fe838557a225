"""experiments/bench_cpu_step.py: the smoke run (ours only, no torch) and its refusals."""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _script():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench_cpu_step
    finally:
        sys.path.pop(0)
    return bench_cpu_step


@pytest.mark.slow
def test_bench_cpu_step_smoke(capsys):
    """Train step, prefill and greedy decode of the tiny model at 2x16 tokens, fp32, one round:
    a row each with a positive tokens/s for ours and "-" for transformers (not run)."""
    assert _script().main(["--smoke"]) == 0
    out = capsys.readouterr().out
    header = "| work | config | dtype | shape | ours tok/s | transformers tok/s | ours/theirs |"
    assert header in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "tiny" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| train", "| prefill", "| decode"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[4].replace(",", "")) > 0 and cells[5:] == ["-", "-"], row
    assert "SMOKE" in out


@pytest.mark.parametrize("flag", ["--configs=tiny,huge", "--work=train,sample", "--dtypes=fp16",
                                  "--rounds=0", "--torch_python=/nonexistent/python"])
def test_bench_cpu_step_refuses_bad_input_in_one_line(flag, capsys):
    assert _script().main([flag]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("bench_cpu_step: ")
