"""Protocol messages: round trip, and every way decoding can fail is a ProtocolError."""

import msgspec
import pytest

from specedge import protocol
from specedge.protocol import (
    GREEDY_TREE_TEMPERATURE,
    ProtocolError,
    SamplingSpec,
    ServiceAnnouncement,
    ServiceLeave,
    decode,
    encode,
    tree_temperature,
)


def announcement(**over) -> ServiceAnnouncement:
    fields = dict(role="verifier", instance_id="verifier-h-1-abc", name="v1", version="0.1.0",
                  heartbeat_s=2.0, details={"model": "tiny"})
    fields.update(over)
    return ServiceAnnouncement(**fields)


def test_round_trip():
    msg = announcement()
    assert decode(encode(msg), ServiceAnnouncement) == msg
    leave = ServiceLeave(role="edge-agent", instance_id="e")
    assert decode(encode(leave), ServiceLeave) == leave


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xc1garbage", "malformed"),
        (b"", "malformed"),
        (msgspec.msgpack.encode({"role": "verifier"}), "invalid"),
        (msgspec.msgpack.encode({**msgspec.structs.asdict(announcement()), "role": "root"}), "invalid"),
        (msgspec.msgpack.encode([1, 2, 3]), "invalid"),
        (msgspec.msgpack.encode({**msgspec.structs.asdict(announcement()), "v": 99}), "version"),
        (b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1), "oversized"),
    ],
)
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ProtocolError) as err:
        decode(data, ServiceAnnouncement)
    assert err.value.reason == reason


def test_unknown_fields_from_a_newer_sender_are_ignored():
    data = msgspec.msgpack.encode({**msgspec.structs.asdict(announcement()), "future": 1})
    assert decode(data, ServiceAnnouncement) == announcement()


def test_rejections_count_by_reason_and_never_raise(caplog):
    import logging

    reject = protocol.Rejections(logging.getLogger("test"))
    assert reject.decode(b"\xc1", ServiceLeave, "a leave") is None
    assert reject.decode(encode(ServiceLeave(role="gateway", instance_id="g")), ServiceLeave, "a leave") is not None
    reject("stale_cycle", "a tree")
    assert dict(reject.counts) == {"malformed": 1, "stale_cycle": 1}
    assert "rejected a leave: malformed" in caplog.text


def test_tree_temperature_follows_the_targets_sampling_within_bounds():
    assert tree_temperature(0.0) == GREEDY_TREE_TEMPERATURE == SamplingSpec().tree_temperature
    assert tree_temperature(0.7) == 0.7
    assert tree_temperature(0.2) == GREEDY_TREE_TEMPERATURE and tree_temperature(1.5) == 1.0
