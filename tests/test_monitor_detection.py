"""benchmarks/monitor_detection.py, reduced: the live monitor's code path it drives still runs end to end, and it
still tells large shifts from clean traffic."""

import json
import sys

import pytest
from benchmarks import monitor_detection as bench


@pytest.mark.slow  # trains the quickstart CNN and a one-layer text Transformer
def test_a_reduced_run_alerts_on_large_shifts_by_window_two_and_writes_its_results(tmp_path, monkeypatch):
    shifts = {"digits": [("noise", 1.0)], "text": [("vocabulary", 0.25), ("label_flip_b", 0.4)]}
    monkeypatch.setattr(bench, "SHIFTS", shifts)
    out = tmp_path / "detection.json"
    argv = ["--seeds", "0", "--clean-windows", "10", "--trials", "2", "--max-windows", "3", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["monitor_detection.py", *argv])
    bench.main()
    doc = json.loads(out.read_text())
    for name, shift in [("digits", "noise=1"), ("text", "vocabulary=0.25"), ("text", "label_flip_b=0.4")]:
        detected = doc["results"][name]["0"]["shifts"][shift]["detection"]
        assert detected["any"]["alert_within_2"] == 1.0, (name, shift, detected["any"])
    clean = doc["results"]["text"]["0"]["false_alarms"]
    assert clean["windows"] == 10 and {"mmd:embedding", "psi:text.length", bench.EOD} <= clean["checks"].keys()
    assert out.with_suffix(".png").stat().st_size > 0
