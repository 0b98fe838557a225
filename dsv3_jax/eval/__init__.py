"""Evaluations of a checkpoint; `python -m dsv3_jax.eval <command>` runs them from the shell.

  needle         needle in a haystack (the DeepSeek-V3 report's Figure 8): run_needle returns
                 the results; needle_report writes needle.json, the heatmap and the tables.
  scoring        Scorer: batched log-likelihoods (also in rolling windows) and generation with
                 stop strings, what an evaluation harness asks of a model.
  perplexity     run_perplexity: a corpus split's per-token loss, perplexity and bits per byte.
  lm_eval_model  DSV3LM, the lm-evaluation-harness model "dsv3_jax". Importing this package
                 registers the name with lm_eval when lm-eval is installed (the class itself is
                 imported only when lm-eval asks for it).
"""

import importlib as _importlib
import importlib.util as _importlib_util

from dsv3_jax.eval.needle import (Needle, NeedleError, answer_logprob, build_case, draw_needle,
                                  draw_needles, filler_stream, is_retrieved, plan_cases,
                                  run_needle, score_answers)
from dsv3_jax.eval.needle_report import format_tables, plot_heatmap, write_results

from dsv3_jax.eval.scoring import Scorer, rolling_windows

LM_EVAL_MODEL = "dsv3_jax"


def _register_with_lm_eval() -> None:
    if _importlib_util.find_spec("lm_eval") is None:
        return
    # lm-eval's own names first: it fills its registry itself only while the registry is empty.
    _importlib.import_module("lm_eval.models")
    from lm_eval.api.registry import model_registry

    if LM_EVAL_MODEL not in model_registry:
        model_registry.register(LM_EVAL_MODEL, target="dsv3_jax.eval.lm_eval_model:DSV3LM")


_register_with_lm_eval()

__all__ = [
    "LM_EVAL_MODEL",
    "Scorer",
    "rolling_windows",
    "Needle",
    "NeedleError",
    "answer_logprob",
    "build_case",
    "draw_needle",
    "draw_needles",
    "filler_stream",
    "format_tables",
    "is_retrieved",
    "plan_cases",
    "plot_heatmap",
    "run_needle",
    "score_answers",
    "write_results",
]
