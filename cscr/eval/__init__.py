"""Evaluation: deferral curves, AUDC / QNC / peak (metrics.py), significance tests
(significance.py), router evaluation (evaluate.py) and reports (report.py). SPEC.md section 6."""

from cscr.eval.evaluate import EvalResult, RouterEval, compare_routers, evaluate_routers

__all__ = ["EvalResult", "RouterEval", "compare_routers", "evaluate_routers"]
