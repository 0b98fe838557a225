"""Evaluations of a checkpoint; `python -m dsv3_jax.eval <command>` runs them from the shell.

  needle         needle in a haystack (the DeepSeek-V3 report's Figure 8): run_needle returns
                 the results; needle_report writes needle.json, the heatmap and the tables.
"""

from dsv3_jax.eval.needle import (Needle, NeedleError, answer_logprob, build_case, draw_needle,
                                  draw_needles, filler_stream, is_retrieved, plan_cases,
                                  run_needle, score_answers)
from dsv3_jax.eval.needle_report import format_tables, plot_heatmap, write_results

__all__ = [
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
