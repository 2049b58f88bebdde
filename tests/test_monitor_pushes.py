"""The monitor's push ledger (fast tier, no Ray): each replica push merged once, in any order, and a restarted
monitor asking for exactly what its saves lack."""

from steward.monitor.pushes import PushLedger


def test_pushes_out_of_order_are_each_taken_once():
    ledger = PushLedger()
    assert [ledger.take("r", seq) for seq in (1, 3, 2, 3, 1, 4)] == [True, True, True, False, False, True]
    assert ledger.applied["r"] == 4 and ledger.ahead["r"] == set()
    assert ledger.take("r", 6) and ledger.to_dict() == {"applied": {"r": 4}, "ahead": {"r": [6]}}


def test_a_restarted_monitor_asks_each_replica_once_for_what_its_saves_lack():
    before = PushLedger()
    for seq in (1, 2, 3, 4):
        before.take("r", seq)
    before.mark_saved({"r": 2}, pending=True)
    before.mark_saved({"r": 4}, pending=False)  # the statistics saved later than the waiting predictions
    assert before.saved("r") == 2  # the replica keeps pushes 3 and 4

    after = PushLedger()
    after.restore(before.to_dict() | {"applied": {"r": 4}}, {"applied": {"r": 2}})
    assert after.resend_from("r", kept_from=3, first=6) == 3  # pushes 3..5 may be missing
    assert after.resend_from("r", kept_from=3, first=6) == 3  # and every push is answered so until they come
    assert after.resend_from("r", kept_from=3, first=3) is None
    # 3 and 4: statistics saved, waiting predictions not; 5: lost with the crash
    assert [(after.take("r", s), after.pending_lost("r", s)) for s in (3, 4, 5)] == [
        (False, True),
        (False, True),
        (True, True),
    ]
    assert after.resend_from("r", kept_from=3, first=6) is None  # heard from: no more asking

    fresh = PushLedger()
    assert fresh.resend_from("new", kept_from=1, first=1) is None  # a replica's first push ever
    fresh.restore({"applied": {}}, None)  # no pending.json: no waiting prediction was saved
    assert fresh.saved("new") == 0
