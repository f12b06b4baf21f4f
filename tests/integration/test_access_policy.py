"""Every RPC of every service, called as every principal kind, answers as the access policy says.

The RPCs are discovered from the services a real server registers, so an RPC added later is
covered without editing this test (and one without a rule stops the server from starting).
Each call sends an empty request (a device names its own device_id): an allowed call may then fail for its content (INVALID_ARGUMENT, NOT_FOUND,
UNIMPLEMENTED, ...), but never with PERMISSION_DENIED or UNAUTHENTICATED.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as repl_grpc

from shared import access_policy
from shared.auth import Principal, is_allowed
from shared.settings import SERVICE_NAMES, load_settings
from tests.conftest import InProcessService, error_reason
from tests.integration.test_consent_decisions import PURCHASES, RECS, grant, withdraw
from tests.integration.test_replenishment_devices import _registration

DENIED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
DEADLINE, OPEN_STREAM_DEADLINE = 10.0, 1.0
NOBODY, BAD_TOKEN = "nobody", "bad token"


async def _requests(message: Any) -> AsyncIterator[Any]:
    yield message


async def call_code(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    metadata: tuple[tuple[str, str], ...],
    device_id: str,
    timeout: float,
) -> grpc.StatusCode:
    """The status code of calling `method` once with an (almost) empty request."""
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    request = request_type()
    if device_id and "device_id" in method.input_type.fields_by_name:
        request.device_id = device_id
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = (
        ("stream" if method.client_streaming else "unary")
        + "_"
        + ("stream" if method.server_streaming else "unary")
    )
    multicallable = getattr(channel, kind)(
        path,
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )
    argument = _requests(request) if method.client_streaming else request
    call = multicallable(argument, metadata=metadata, timeout=timeout)
    try:
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def callers(
    service: InProcessService, device: tuple[str, str] | None
) -> dict[str, tuple[tuple[str, str], ...]]:
    """Principal (or NOBODY, BAD_TOKEN) -> call metadata: admin, every dev service principal, a device."""
    found = {principal: service.auth(principal) for principal in service.tokens}
    found[NOBODY] = ()
    found[BAD_TOKEN] = (("authorization", "Bearer not-a-real-token"),)
    if device is not None:
        device_id, token = device
        found[f"device:{device_id}"] = (("authorization", f"Bearer {token}"),)
    return found


def expected(principal: str, rule: frozenset[str], resolves_devices: bool) -> grpc.StatusCode | None:
    """The code the policy requires: a denial code, or None for "anything but a denial"."""
    if principal in (NOBODY, BAD_TOKEN):
        return grpc.StatusCode.UNAUTHENTICATED
    if principal.startswith("device:") and not resolves_devices:
        return grpc.StatusCode.UNAUTHENTICATED  # only replenishment knows device tokens
    return None if is_allowed(Principal.parse(principal), rule) else grpc.StatusCode.PERMISSION_DENIED


async def registered_device(service: InProcessService) -> tuple[str, str]:
    stub = repl_grpc.ReplenishmentServiceStub(service.channel)
    registered = await stub.RegisterDevice(_registration(), metadata=service.auth("service:storefront"))
    return registered.device.device_id, registered.device_token


@pytest.mark.parametrize("name", ["consent", "profile", "recommendation", "replenishment"])
async def test_every_rpc_answers_every_principal_as_the_policy_says(start_service, name):
    # Profile's consent cache points at a closed port: its RPCs then refuse for staleness, not access.
    overrides = {"consent_address": "127.0.0.1:9"} if name == "profile" else {}
    service = await start_service(name, **overrides)
    app = service.running.app
    resolves_devices = bool(app.token_resolvers)
    device = await registered_device(service) if name == "replenishment" else None
    principals = callers(service, device)
    device_id = device[0] if device else "d-unknown"
    assert {"admin", *access_policy.named_service_principals()} <= set(principals)

    wrong: list[str] = []
    calls = 0
    for registration in app.registrations:
        rules = access_policy.rules_for(registration.descriptor)
        for method in registration.descriptor.methods:
            for principal, metadata in principals.items():
                want = expected(principal, rules[method.name], resolves_devices)
                # An allowed watch may stay open: its deadline ends it (DEADLINE_EXCEEDED is no denial).
                timeout = OPEN_STREAM_DEADLINE if want is None and method.server_streaming else DEADLINE
                # A device names itself; others send nothing (admin would deregister it otherwise).
                own = device_id if principal.startswith("device:") else ""
                code = await call_code(service.channel, method, metadata, own, timeout)
                calls += 1
                if (want is None and code in DENIED) or (want is not None and code != want):
                    wanted = want.name if want else "anything but a denial"
                    wrong.append(f"{method.full_name} as {principal}: {code.name}, expected {wanted}")
    assert not wrong, "\n".join(wrong)
    assert calls >= 2 * len(principals)


async def test_a_device_may_not_act_for_another_device(start_service):
    service = await start_service("replenishment")
    device_id, token = await registered_device(service)
    stub = device_grpc.DeviceServiceStub(service.channel)
    as_device = (("authorization", f"Bearer {token}"),)
    for call in (
        stub.GetForecast(
            device_pb.GetForecastRequest(device_id="d-other", slot_id="black"), metadata=as_device
        ),
        stub.Replenish(device_pb.ReplenishRequest(device_id="d-other", slot_id="black"), metadata=as_device),
        stub.ReportTelemetry(device_pb.ReportTelemetryRequest(device_id="d-other"), metadata=as_device),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(caught.value) == "DEVICE_MISMATCH"
    stream = stub.StreamTelemetry(
        _requests(device_pb.StreamTelemetryRequest(device_id="d-other")), metadata=as_device
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream:
            pass
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Its own device passes the check and gets its answer.
    own = await stub.GetForecast(
        device_pb.GetForecastRequest(device_id=device_id, slot_id="black"), metadata=as_device
    )
    assert own.forecast.slot_id == "black"


async def test_internal_services_cannot_write_consent_or_order_erasures(start_service):
    """The issue's finding: a leaked catalog (or any internal) token recorded consent in anyone's
    name and erased anyone. Now every such call is refused and leaves nothing behind."""
    consent = await start_service("consent", data_subject_services="")
    stub = consent_grpc.ConsentServiceStub(consent.channel)
    internal = [p for p in consent.tokens if p.startswith("service:")]
    internal = [p for p in internal if p not in access_policy.CUSTOMER_FACING.principals]
    assert {"service:catalog", "service:fulfilment", "service:campaign", "service:profile"} <= set(internal)
    form = consent_pb.SetConsentsRequest(
        customer_id="c-1",
        decisions=[
            consent_pb.ConsentDecisionInput(
                purpose=RECS,
                decision=consent_pb.CONSENT_DECISION_GRANTED,
                data_categories=[PURCHASES],
                notice_version=1,
            )
        ],
        collection_method=consent_pb.COLLECTION_METHOD_WEB_FORM,
        jurisdiction="DE",
        request_id="form-1",
    )
    erase = consent_pb.CreateDataSubjectRequestRequest(
        customer_id="c-1", type=consent_pb.DATA_SUBJECT_REQUEST_TYPE_ERASE, request_id="erase-1"
    )
    for principal in internal:
        metadata = consent.auth(principal)
        for call in (
            stub.GrantConsent(grant(), metadata=metadata),
            stub.WithdrawConsent(withdraw(), metadata=metadata),
            stub.SetConsents(form, metadata=metadata),
            stub.CreateDataSubjectRequest(erase, metadata=metadata),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, principal
            assert error_reason(caught.value) == "PRINCIPAL_NOT_ALLOWED"
    admin = consent.auth()
    state = await stub.GetConsentState(consent_pb.GetConsentStateRequest(customer_id="c-1"), metadata=admin)
    assert state.consents and {c.status for c in state.consents} == {consent_pb.CONSENT_STATUS_NOT_GIVEN}
    requests = await stub.ListDataSubjectRequests(consent_pb.ListDataSubjectRequestsRequest(), metadata=admin)
    assert list(requests.data_subject_requests) == []
    # The same calls from a customer-facing back end are carried out.
    for n, principal in enumerate(access_policy.CUSTOMER_FACING.principals):
        metadata = consent.auth(principal)
        await stub.GrantConsent(grant(request_id=f"g-{n}"), metadata=metadata)
        await stub.CreateDataSubjectRequest(
            consent_pb.CreateDataSubjectRequestRequest(
                customer_id=f"c-{n}", type=consent_pb.DATA_SUBJECT_REQUEST_TYPE_EXPORT, request_id="export-1"
            ),
            metadata=metadata,
        )
    requests = await stub.ListDataSubjectRequests(consent_pb.ListDataSubjectRequestsRequest(), metadata=admin)
    assert len(requests.data_subject_requests) == len(access_policy.CUSTOMER_FACING.principals)
    state = await stub.GetConsentState(consent_pb.GetConsentStateRequest(customer_id="c-1"), metadata=admin)
    granted = [c.purpose for c in state.consents if c.status == consent_pb.CONSENT_STATUS_GRANTED]
    assert granted == [RECS]


def test_the_table_holds_exactly_the_services_the_apps_register(tmp_path):
    registered: set[str] = set()
    for name in SERVICE_NAMES:
        settings = load_settings(name, data_dir=tmp_path, metrics_port=0)
        app = importlib.import_module(f"services.{name}.app").build_app(settings)
        names = [registration.descriptor.full_name for registration in app.registrations]
        assert access_policy.DATA_SUBJECT_SERVICE in names, name
        registered.update(names)
    assert registered == set(access_policy.POLICY)
