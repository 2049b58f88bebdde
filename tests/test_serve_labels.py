"""Late labels at a replica: signed request ids and the /feedback rate limit (no Ray)."""

import time

from steward.serve.labels import REQUEST_ID_LENGTH, RateLimit, RequestIds


def test_a_deployment_recognises_the_ids_it_issued_and_no_others():
    ids, other = RequestIds(b"k" * 32), RequestIds(b"q" * 32)
    issued = ids.issue(100)
    assert len(set(issued)) == 100 and all(len(i) == REQUEST_ID_LENGTH for i in issued)
    assert all(ids.issued(i) for i in issued)
    assert not any(other.issued(i) for i in issued)  # another deployment's (or a redeployed run's) key
    made_up = [issued[0][:-1] + ("0" if issued[0][-1] != "0" else "1"), "0" * REQUEST_ID_LENGTH, "", issued[0] + "0"]
    assert not any(ids.issued(i) for i in made_up)


def test_the_rate_limit_allows_a_seconds_burst_then_says_how_long_to_wait():
    limit = RateLimit(5)
    assert [limit.wait() for _ in range(5)] == [0] * 5
    assert limit.wait() == 1  # whole seconds, for Retry-After
    limit.at -= 0.5  # half a second later: 2.5 tokens back
    assert [limit.wait() for _ in range(3)] == [0, 0, 1]


def test_a_slow_rate_still_allows_one_event_and_waits_whole_seconds():
    limit = RateLimit(0.2)
    assert limit.wait() == 0
    assert limit.wait() == 5
    limit.at = time.monotonic() - 5
    assert limit.wait() == 0
