#!/usr/bin/env python3
"""Hand-rolled protobuf for bench/envoy-rls.sh (no dependencies): writes a gRPC-framed
RateLimitRequest, and reads a gRPC-framed RateLimitResponse.

  envoy_grpc.py request DOMAIN KEY VALUE OUT   # 1 flag byte + 4-byte length + protobuf
  envoy_grpc.py response FILE                  # prints overall_code and each status
"""

import struct
import sys


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def request(domain: str, key: str, value: str) -> bytes:
    entry = field(1, key.encode()) + field(2, value.encode())
    descriptor = field(1, entry)  # RateLimitDescriptor.entries = 1
    message = field(1, domain.encode()) + field(2, descriptor)
    return b"\x00" + struct.pack(">I", len(message)) + message


def parse(data: bytes) -> dict:
    """Fields of one message: number -> list of varints or raw bytes."""
    fields: dict = {}
    i = 0
    while i < len(data):
        tag, i = read_varint(data, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = read_varint(data, i)
        elif wire == 2:
            length, i = read_varint(data, i)
            value, i = data[i : i + length], i + length
        else:
            raise ValueError(f"unexpected wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def read_varint(data: bytes, i: int):
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, i


CODES = {0: "UNKNOWN", 1: "OK", 2: "OVER_LIMIT"}


def response(path: str) -> None:
    data = open(path, "rb").read()
    if len(data) < 5:
        raise SystemExit(f"no gRPC message in {path} ({len(data)} bytes)")
    (length,) = struct.unpack(">I", data[1:5])
    message = parse(data[5 : 5 + length])
    print("overall_code", CODES[message.get(1, [0])[0]])
    for raw in message.get(2, []):
        status = parse(raw)
        limit = parse(status[2][0]) if 2 in status else {}
        print(
            "status",
            CODES[status.get(1, [0])[0]],
            "requests_per_unit", limit.get(1, [0])[0],
            "limit_remaining", status.get(3, [0])[0],
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["request"] and len(sys.argv) == 6:
        open(sys.argv[5], "wb").write(request(*sys.argv[2:5]))
    elif sys.argv[1:2] == ["response"] and len(sys.argv) == 3:
        response(sys.argv[2])
    else:
        raise SystemExit(__doc__)
