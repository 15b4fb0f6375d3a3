"""Unit tests of faasd.eventstream, read back by botocore's own event stream parser."""

from __future__ import annotations

import json
import struct

import botocore.session
import pytest
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from botocore.parsers import create_parser

from faasd.eventstream import encode_event, encode_message


class RawStream:
    """What botocore's EventStream reads: a body that hands out its bytes in pieces."""

    def __init__(self, data: bytes, piece: int = 7) -> None:
        self.data = data
        self.piece = piece

    def stream(self):
        for start in range(0, len(self.data), self.piece):
            yield self.data[start:start + self.piece]

    def close(self) -> None:
        pass


def messages(data: bytes) -> list:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return list(buffer)


def lambda_events(data: bytes, piece: int = 7) -> list[dict]:
    """The events boto3's invoke_with_response_stream yields for a body of `data`,
    parsed by botocore as it parses Lambda's answer."""
    operation = botocore.session.get_session().get_service_model("lambda") \
        .operation_model("InvokeWithResponseStream")
    parsed = create_parser("rest-json").parse(
        {"status_code": 200, "headers": {"content-type": "application/vnd.amazon.eventstream"},
         "body": RawStream(data, piece), "context": {"operation_name": operation.name}},
        operation.output_shape)
    return list(parsed["EventStream"])


def test_a_message_has_its_headers_payload_and_both_checksums():
    data = encode_message({":event-type": "PayloadChunk", "x-näme": "välue"}, b"hello")
    [message] = messages(data)
    assert message.headers == {":event-type": "PayloadChunk", "x-näme": "välue"}
    assert message.payload == b"hello"
    total, headers_length = struct.unpack(">II", data[:8])
    assert total == len(data)
    assert message.prelude.headers_length == headers_length


def test_an_empty_payload_and_no_headers_still_make_a_message():
    [message] = messages(encode_message({}, b""))
    assert message.headers == {} and message.payload == b""


def test_a_changed_byte_fails_the_checksum():
    data = bytearray(encode_event("PayloadChunk", b"hello", "application/octet-stream"))
    data[-6] ^= 1  # a payload byte: the message CRC no longer matches
    with pytest.raises(ChecksumMismatch):
        messages(bytes(data))
    data = bytearray(encode_event("PayloadChunk", b"hello", "application/octet-stream"))
    data[5] ^= 1  # the headers length: the prelude CRC no longer matches
    with pytest.raises(ChecksumMismatch):
        messages(bytes(data))


def test_events_read_back_as_lambdas_invoke_with_response_stream_events():
    chunks = [b'{"k": ', bytes(range(256)) * 300, b"}"]
    complete = {"ErrorCode": "ValueError", "ErrorDetails": '{"errorMessage": "no"}', "LogResult": "U1RBUlQ="}
    data = b"".join([*(encode_event("PayloadChunk", c, "application/octet-stream") for c in chunks),
                     encode_event("InvokeComplete", json.dumps(complete).encode(), "application/json")])
    for piece in (1, 7, 64 * 1024, len(data)):  # however the body arrives
        events = lambda_events(data, piece)
        assert events == [*({"PayloadChunk": {"Payload": c}} for c in chunks), {"InvokeComplete": complete}]


def test_each_event_says_it_is_an_event_and_what_it_carries():
    [message] = messages(encode_event("InvokeComplete", b"{}", "application/json"))
    assert message.headers == {":event-type": "InvokeComplete", ":content-type": "application/json",
                               ":message-type": "event"}
    assert lambda_events(encode_event("InvokeComplete", b"{}", "application/json")) == [{"InvokeComplete": {}}]
