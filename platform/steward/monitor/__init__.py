"""Bias and drift monitoring: pure numpy/scipy maths over arrays and mergeable window state, and one Ray actor.

The maths (no Ray): bias.py, group fairness metrics (Fairlearn / AIF360 definitions); drift.py, two-sample drift
statistics and tests; window_state.py + reservoir.py + bins.py, streaming window state, mergeable across replicas;
windowing.py, cutting a stream of states into windows; reference.py, the training-time reference profile; checks.py,
judging a window; signals.py, what one record contributes; report.py, the HTML report.
actor.py: the monitor actor, the one Ray piece, that merges replicas' pushes and judges each window.
"""
