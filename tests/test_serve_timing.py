"""A request's phases inside a replica, as the Server-Timing header carries them (no Ray)."""

import time

from steward.serve.timing import Timing, parse_header


def test_phases_add_up_to_the_time_measured_and_parts_move_out_of_their_phase():
    started = time.perf_counter()
    timing = Timing()
    time.sleep(0.01)
    timing.mark("parse")
    time.sleep(0.03)
    timing.mark("wait")
    timing.split("wait", encode=0.005, forward=0.01)
    total = time.perf_counter() - started
    phases = parse_header(timing.header())
    assert list(phases) == ["parse", "wait", "encode", "forward"]
    assert phases["parse"] >= 10 and phases["wait"] >= 15 and (phases["encode"], phases["forward"]) == (5, 10)
    # The phases cover the time between the first and the last mark: at least what was slept, at most what the
    # test measured around them (a loaded machine may pause the test between a mark and its own clock).
    assert 40 <= sum(phases.values()) <= total * 1000


def test_a_header_with_other_entries_and_descriptions_parses_to_its_durations():
    header = 'cdn-cache;desc="HIT", parse;dur=0.125, edge;dur=1.5;desc="proxy"'
    assert parse_header(header) == {"parse": 0.125, "edge": 1.5}
