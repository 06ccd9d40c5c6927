"""The checked-in gRPC stubs are what the pinned generator makes from the .proto, and the .proto's wire
layout is Triton's (checked against the descriptors tritonclient ships)."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as triton

from luoshu.serving.proto import __main__ as generator
from luoshu.serving.proto import grpc_predict_v2_pb2 as ours


def test_checked_in_stubs_are_generated_from_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    for path in generator.generate(tmp_path):
        checked_in = generator.HERE / path.name
        assert path.read_text() == checked_in.read_text(), f"{path.name} is stale: run python -m luoshu.serving.proto"


def _fields(descriptor) -> dict:
    return {
        f.name: (f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None)
        for f in descriptor.fields
    }


def _walk(descriptor):
    yield descriptor
    for nested in descriptor.nested_types:
        yield from _walk(nested)


def test_messages_match_tritons_wire_layout():
    for name, message in ours.DESCRIPTOR.message_types_by_name.items():
        theirs = triton.DESCRIPTOR.message_types_by_name[name]
        for mine in _walk(message):
            other = triton.DESCRIPTOR.pool.FindMessageTypeByName(mine.full_name) if mine is not message else theirs
            their_fields = _fields(other)
            for field, layout in _fields(mine).items():
                assert their_fields.get(field) == layout, (mine.full_name, field, layout, their_fields.get(field))
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        other = their_service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            other.input_type.full_name,
            other.output_type.full_name,
        )
