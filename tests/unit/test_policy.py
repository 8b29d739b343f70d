"""Router policies are pure functions of the pools' views."""

from router.policy import DecodeView, PrefillView, choose_decode, choose_prefill


def test_decode_needs_ready_and_room():
    ws = [DecodeView("d0", False, 100, 0), DecodeView("d1", True, 3, 0), DecodeView("d2", True, 10, 5)]
    assert choose_decode(ws, 4) == "d2"
    assert choose_decode(ws, 11) is None
    assert choose_decode([], 1) is None


def test_decode_prefers_small_batch_then_free_pages():
    ws = [DecodeView("d0", True, 50, 4), DecodeView("d1", True, 20, 1), DecodeView("d2", True, 90, 1)]
    assert choose_decode(ws, 1) == "d2"
    # requests the router sent but the last status did not count yet weigh like running ones
    ws = [DecodeView("d0", True, 50, 1, inflight=0), DecodeView("d1", True, 90, 0, inflight=3)]
    assert choose_decode(ws, 1) == "d0"


def test_prefill_least_loaded_ready_and_deterministic():
    ws = [PrefillView("p1", True, 2), PrefillView("p0", True, 2), PrefillView("p2", False, 0)]
    assert choose_prefill(ws) == "p0"
    assert choose_prefill([PrefillView("p0", True, 3), PrefillView("p1", True, 1)]) == "p1"
    assert choose_prefill([PrefillView("p0", False, 0)]) is None
