"""The notebooks under notebooks/: stored clean, and each one runs top to bottom on CPU.

Every notebook reads DSV3_NOTEBOOK_SMOKE=1 in its settings cell and then trains for a few steps on
a small corpus. It asserts itself that the arrays it plots are non-empty and finite (and, in
03_mtp, that greedy speculative decoding equals plain greedy decoding). Here the kernel must finish
without an error, every figure must have been drawn from those arrays (image/png outputs) and saved
under its workdir's figures/ folder as a PNG that is not blank.

The kernel is this interpreter (`kernel_name="python3"` resolves to sys.executable when ipykernel
is installed beside it), started in a temporary directory, so the notebooks' relative `runs/`
folders land there. It shares the suite's persistent compilation cache (conftest.COMPILATION_CACHE).
"""

from __future__ import annotations

import base64
import os
import pathlib
import re

import numpy as np
import pytest

from conftest import COMPILATION_CACHE

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))

# The figures each notebook saves (file names under <its workdir>/figures/).
FIGURES = {
    "01_quickstart.ipynb": {"loss.png", "kv_cache.png"},
    "02_routing.ipynb": {"expert_load_heatmaps.png", "bias_and_imbalance.png"},
    "03_mtp.ipynb": {"mtp_training.png", "speculative_decoding.png"},
    "04_fp8.ipynb": {"fp8_vs_bf16_loss.png", "fp8_quantization_errors.png", "fp8_gemm_calc_diff.png",
                     "fp8_outlier_sweep.png"},
    "05_sft.ipynb": {"sft_loss.png"},
}
SMOKE_VARIABLE = "DSV3_NOTEBOOK_SMOKE"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A path of one machine in a notebook's source (a home, a checkout, a temp folder).
MACHINE_PATH = re.compile(r"""["'](?:/(?:home|root|Users|work|tmp|content|private)/|[A-Za-z]:\\)""")


def _read(name):
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_the_notebooks_are_there():
    assert set(FIGURES) <= set(ALL), f"missing notebooks: {sorted(set(FIGURES) - set(ALL))}"


@pytest.mark.parametrize("name", ALL)
def test_stored_clean(name):
    """Valid nbformat 4, no outputs or execution counts, a title, a settings cell with the smoke
    switch, and no paths of one machine."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.reads((NOTEBOOKS / name).read_text(encoding="utf-8"), as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} has stored outputs: clear them before committing"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count: clear it"
        for line in cell.source.splitlines():
            assert not MACHINE_PATH.search(line), f"{name} cell {i} names a path of one machine: {line}"
        assert "PLACEHOLDER" not in cell.source, f"{name} cell {i} is unfinished (PLACEHOLDER)"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), f"{name}: no title cell"
    assert any(SMOKE_VARIABLE in c.source for c in code), (
        f"{name}: no settings cell reads {SMOKE_VARIABLE} (the small settings the test runs with)")


def _png(data) -> bytes:
    blob = base64.b64decode(data) if isinstance(data, str) else data
    assert blob.startswith(PNG_MAGIC), "an image/png output is not a PNG"
    return blob


def _not_blank(png_path: pathlib.Path) -> None:
    import matplotlib.image

    pixels = matplotlib.image.imread(png_path)
    assert pixels.size and np.ptp(pixels[..., :3]) > 0.1, f"{png_path.name} is blank"


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_runs_top_to_bottom(name, tmp_path):
    """The notebook with its small settings, in a fresh kernel, on CPU."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    nb = _read(name)
    env = dict(os.environ,
               **{SMOKE_VARIABLE: "1"},
               JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               # plt.show() must render into the notebook (a CI-wide MPLBACKEND=Agg would not).
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, startup_timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute(env=env)
    finally:  # the executed notebook, for reading after a failure
        nbformat.write(nb, tmp_path / f"executed_{name}")

    images = [_png(out["data"]["image/png"]) for cell in nb.cells if cell.cell_type == "code"
              for out in cell.outputs if "image/png" in out.get("data", {})]
    expected = FIGURES.get(name, set())
    assert len(images) >= max(1, len(expected)), f"{name} drew {len(images)} figure(s)"
    saved = {p.name: p for p in tmp_path.glob("runs/*/figures/*.png")}
    assert expected <= set(saved), f"{name} saved {sorted(saved)}, expected {sorted(expected)}"
    for figure in expected:
        _not_blank(saved[figure])
