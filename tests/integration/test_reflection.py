"""Server reflection on every service: FileContainingSymbol resolves every method of every
registered service (what `grpcurl describe pkg.Service.Method` asks), found from the
services' own descriptors, and still resolves services, messages, enums and nested types."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared.settings import SERVICE_NAMES
from tests.postgres import free_port


async def ask(channel: grpc.aio.Channel, requests: list[reflection_pb2.ServerReflectionRequest]) -> list:
    """The reflection service's answers to `requests`, in one stream (as grpcurl sends them)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return [answer async for answer in stub.ServerReflectionInfo(iter(requests), timeout=10)]


def defining_file(answer: reflection_pb2.ServerReflectionResponse) -> descriptor_pb2.FileDescriptorProto:
    """The first file of a FileDescriptorResponse: the one that defines the symbol asked for."""
    assert answer.WhichOneof("message_response") == "file_descriptor_response", answer.error_response
    return descriptor_pb2.FileDescriptorProto.FromString(
        answer.file_descriptor_response.file_descriptor_proto[0]
    )


def type_names(message: Descriptor) -> list[str]:
    """A message's full name and those of its nested messages and enums, all the way down."""
    names = [message.full_name, *(enum.full_name for enum in message.enum_types)]
    for nested in message.nested_types:
        names.extend(type_names(nested))
    return names


@pytest.mark.parametrize("name", SERVICE_NAMES)
async def test_every_method_of_every_service_resolves_to_its_file(start_service, name):
    extra = {"consent_address": f"127.0.0.1:{free_port()}"} if name == "profile" else {}
    service = await start_service(name, **extra)
    listed = await ask(service.channel, [reflection_pb2.ServerReflectionRequest(list_services="")])
    offered = {s.name for s in listed[0].list_services_response.service}
    assert "grpc.reflection.v1alpha.ServerReflection" in offered

    symbols: dict[str, str] = {}  # symbol -> the file that must come back
    for registration in service.running.app.registrations:
        descriptor = registration.descriptor
        assert descriptor.full_name in offered
        symbols[descriptor.full_name] = descriptor.file.name
        for method in descriptor.methods:
            symbols[method.full_name] = descriptor.file.name
            for message in (method.input_type, method.output_type):
                symbols.update(dict.fromkeys(type_names(message), message.file.name))
        enums: list[EnumDescriptor] = list(descriptor.file.enum_types_by_name.values())
        symbols.update({enum.full_name: enum.file.name for enum in enums})

    answers = await ask(
        service.channel,
        [reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol) for symbol in symbols],
    )
    assert len(answers) == len(symbols)
    for symbol, answer in zip(symbols, answers, strict=True):
        assert answer.original_request.file_containing_symbol == symbol
        assert defining_file(answer).name == symbols[symbol], symbol

    # A method's answer is the file whose service declares that method.
    for registration in service.running.app.registrations:
        for method in registration.descriptor.methods:
            [answer] = await ask(
                service.channel,
                [reflection_pb2.ServerReflectionRequest(file_containing_symbol=method.full_name)],
            )
            declared = {(s.name, m.name) for s in defining_file(answer).service for m in s.method}
            assert (registration.descriptor.name, method.name) in declared


async def test_unknown_symbols_are_not_found(start_service):
    service = await start_service("consent")
    unknown = [
        "najimi.consent.v1.ConsentService.NoSuchMethod",
        "najimi.consent.v1.NoSuchService.ListPurposes",
        "no.such.Symbol",
        "",
    ]
    answers = await ask(
        service.channel, [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in unknown]
    )
    assert [a.error_response.error_code for a in answers] == [grpc.StatusCode.NOT_FOUND.value[0]] * len(
        unknown
    )
