"""Unit tests of the streaming client's response decoding (no server)."""

from __future__ import annotations

import struct

import pytest

pytest.importorskip("tritonclient.grpc")

from tritonclient.grpc import service_pb2  # noqa: E402

from client.api import _first_bytes  # noqa: E402


def _response(texts: dict[str, bytes]) -> object:
    infer = service_pb2.ModelInferResponse(id="1/0")
    for name, raw in texts.items():
        out = infer.outputs.add()
        out.name, out.datatype = name, "BYTES"
        out.shape.extend([1, 1])
        infer.raw_output_contents.append(struct.pack("<I", len(raw)) + raw)
    return infer


@pytest.mark.parametrize("text", [b"", b"Guten Tag", "größer 山".encode()])
def test_text_is_read_from_the_raw_output_empty_strings_included(text):
    """TEXT is often empty; tritonclient 2.73's own decoding returns no element for it (seen on the GPU machine)."""
    infer = _response({"RESPONSE_INDEX": b"", "TEXT": text})
    assert _first_bytes(infer, "TEXT") == text
    assert _first_bytes(infer, "MISSING") is None
    assert _first_bytes(service_pb2.ModelInferResponse(), "TEXT") is None


def test_an_empty_raw_buffer_is_an_empty_string():
    """tritonserver 2.51 with the model on KIND_GPU sent an empty TEXT as a buffer of 0 bytes (no length prefix);
    the client read it as a broken stream and failed every stream on the connection."""
    infer = service_pb2.ModelInferResponse(id="1/0")
    out = infer.outputs.add()
    out.name, out.datatype = "TEXT", "BYTES"
    out.shape.extend([1, 1])
    infer.raw_output_contents.append(b"")
    assert _first_bytes(infer, "TEXT") == b""
