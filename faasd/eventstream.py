"""AWS's event stream framing (`application/vnd.amazon.eventstream`), the body
of Lambda's InvokeWithResponseStream answer.

A stream is a sequence of messages, each self-delimiting and checksummed
(all integers big-endian):

    total length     4 bytes: the whole message, these 4 bytes included
    headers length   4 bytes
    prelude CRC      4 bytes: CRC32 of the 8 bytes above
    headers          each: name length (1 byte), name (UTF-8), value type
                     (1 byte; 7 is a string), value length (2 bytes), value (UTF-8)
    payload
    message CRC      4 bytes: CRC32 of everything before it, prelude CRC included

faasd only writes events: string headers `:event-type`, `:content-type` and
`:message-type` = `event`, which botocore (botocore/eventstream.py) and the
other SDKs turn into the operation's event structures.
"""

from __future__ import annotations

import struct
import zlib
from typing import Mapping

STRING = 7  # the header value type of a UTF-8 string


def encode_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One message: its prelude, headers, payload and the two CRCs."""
    encoded = b"".join(_header(name, value) for name, value in headers.items())
    lengths = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = lengths + struct.pack(">I", zlib.crc32(lengths)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def encode_event(event_type: str, payload: bytes, content_type: str) -> bytes:
    """An event message, as botocore's EventStream parses it into `{event_type: ...}`."""
    return encode_message({":event-type": event_type, ":content-type": content_type,
                           ":message-type": "event"}, payload)


def _header(name: str, value: str) -> bytes:
    name_bytes, value_bytes = name.encode(), value.encode()
    return (struct.pack(">B", len(name_bytes)) + name_bytes
            + struct.pack(">BH", STRING, len(value_bytes)) + value_bytes)
