"""Bias and drift monitoring maths: pure numpy/scipy functions over arrays and mergeable window state, no Ray.

bias.py: group fairness metrics (Fairlearn / AIF360 definitions). drift.py: two-sample drift statistics and tests.
window.py + reservoir.py: streaming, mergeable window state. reference.py: the training-time reference profile.
"""
