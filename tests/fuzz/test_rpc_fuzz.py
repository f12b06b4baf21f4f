"""Every RPC of every service, sent hostile requests by everyone, answers only documented codes.

The RPCs come from the services' own registrations (tests/fuzz/rpcs.py), the requests
from their message descriptors (tests/fuzz/messages.py). Each request goes to the real
suite (tests/fuzz/suite.py) as a principal the RPC admits, as any other, as a device, as
nobody or with a bad token. After each RPC's examples, every server must still answer
health, and the process (servers included) must not have grown past RSS_GROWTH_BOUND_MIB.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from hypothesis import given, seed
from hypothesis import strategies as st

from tests.fuzz.conftest import DERANDOMIZE, FUZZ_SETTINGS, RPCS
from tests.fuzz.faults import (
    ANSWERS_WITHOUT_A_VALID_TOKEN,
    DOCUMENTED,
    DOCUMENTED_ON_A_WATCH,
    Fault,
)
from tests.fuzz.messages import (
    RequestGenerator,
    Seeds,
    field_names,
    garbage_bodies,
    page_tokens,
    request_bodies,
)
from tests.fuzz.rpcs import Rpc
from tests.fuzz.suite import BAD_TOKEN_PRINCIPAL, DEVICE, NOBODY, FuzzSuite

# How much the test process (the four servers run in it) may grow over the whole run:
# the servers' caches and SQLite page caches fill, the data they hold grows, the allocator
# keeps some freed memory. Measured (VmRSS after a malloc_trim): +66 to +136 MiB with 12-25
# examples per RPC and test, +335 MiB with 400. A leak of a few KiB per call goes past it.
RSS_GROWTH_BOUND_MIB = 200 + FUZZ_SETTINGS.max_examples // 2
STREAM_MESSAGES = 4  # at most this many request messages on a streaming call

pytestmark = pytest.mark.fuzz


def _run(rpc: Rpc, test: Callable[..., None]) -> None:
    """Runs a Hypothesis test under the profile's settings; `ci` seeds it by RPC."""
    test = FUZZ_SETTINGS(given(data=st.data())(test))
    if DERANDOMIZE:
        test = seed(zlib.crc32(rpc.path.encode() + rpc.app.encode()))(test)
    test()


def _principals(suite: FuzzSuite, rpc: Rpc) -> st.SearchStrategy[str]:
    """Mostly someone the RPC admits (to get past the door); else anyone, a device, nobody."""
    admitted = suite.admitted.get(rpc.path) or ["admin"]
    everyone = [*suite.tokens, DEVICE, NOBODY, BAD_TOKEN_PRINCIPAL]
    return st.one_of(st.sampled_from(admitted), st.sampled_from(admitted), st.sampled_from(everyone))


def _generator(suite: FuzzSuite, rpc: Rpc) -> RequestGenerator:
    seeds = Seeds([*suite.demo_ids, suite.device_id, *_vocabulary()], suite.page_tokens)
    seeds.known_strings += seeds.all_tokens()  # a token where an id belongs, too
    return RequestGenerator(seeds, suite.page_tokens.get(rpc.path, []), field_names(rpc.input_type))


def _vocabulary() -> list[str]:
    return [
        "personalize.recommendations",
        "personalize.profiling",
        "replenishment.automatic_ordering",
        "user.behavior.purchase_history",
        "user.device.telemetry",
        "black",
    ]


def _send_and_check(suite: FuzzSuite, rpc: Rpc, principal: str, bodies: list[bytes]) -> None:
    request_id = suite.new_request_id()
    outcome = suite.call(rpc, principal, bodies, request_id)
    if principal == DEVICE and outcome.code == grpc.StatusCode.UNAUTHENTICATED:
        suite.register_device()  # the fuzzer deregistered it (or rotated its token): a new one
    documented = DOCUMENTED_ON_A_WATCH if rpc.is_watch else DOCUMENTED
    if principal in (NOBODY, BAD_TOKEN_PRINCIPAL):
        documented = ANSWERS_WITHOUT_A_VALID_TOKEN
    if outcome.code in documented:
        return
    fault = Fault(rpc, principal, outcome, bodies, request_id, suite.failures.by_request_id.get(request_id))
    expected = ", ".join(sorted(code.name for code in documented))
    raise AssertionError(f"{fault.report()}\n  expected   one of {expected}")


def _still_well(suite: FuzzSuite, rpc: Rpc) -> None:
    health = suite.health()
    assert set(health.values()) == {"SERVING"}, f"after fuzzing {rpc}, health answered {health}"
    grown_mib = suite.record_memory(str(rpc))
    assert grown_mib < RSS_GROWTH_BOUND_MIB, (
        f"after fuzzing {rpc}, the process has grown {grown_mib:.0f} MiB since the suite started "
        f"(bound {RSS_GROWTH_BOUND_MIB} MiB)"
    )


def _messages(rpc: Rpc, one: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
    if rpc.client_streaming:
        return st.lists(one, min_size=1, max_size=STREAM_MESSAGES)
    return one.map(lambda body: [body])


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_generated_requests_get_documented_answers(fuzz_suite: FuzzSuite, rpc: Rpc) -> None:
    bodies = _messages(rpc, request_bodies(_generator(fuzz_suite, rpc), rpc.input_type))
    principals = _principals(fuzz_suite, rpc)

    def fuzz(data: Any) -> None:
        _send_and_check(fuzz_suite, rpc, data.draw(principals, "principal"), data.draw(bodies, "bodies"))

    _run(rpc, fuzz)
    _still_well(fuzz_suite, rpc)


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_undecodable_bodies_get_documented_answers(fuzz_suite: FuzzSuite, rpc: Rpc) -> None:
    generator = _generator(fuzz_suite, rpc)
    garbage = garbage_bodies(generator, rpc.input_type)
    if rpc.client_streaming:
        # Several messages, some of them garbage, some that decode.
        one = st.one_of(garbage, request_bodies(generator, rpc.input_type))
        bodies = st.tuples(garbage, st.lists(one, max_size=STREAM_MESSAGES - 1), st.integers(0, 3)).map(
            lambda drawn: [*drawn[1][: drawn[2]], drawn[0], *drawn[1][drawn[2] :]]
        )
    else:
        bodies = garbage.map(lambda body: [body])
    principals = _principals(fuzz_suite, rpc)

    def fuzz(data: Any) -> None:
        _send_and_check(fuzz_suite, rpc, data.draw(principals, "principal"), data.draw(bodies, "bodies"))

    _run(rpc, fuzz)
    _still_well(fuzz_suite, rpc)


PAGED = [rpc for rpc in RPCS if any(f.name.endswith(("page_token", "cursor")) for f in rpc.input_type.fields)]


@pytest.mark.parametrize("rpc", PAGED, ids=str)
def test_page_tokens_real_edited_or_foreign_get_documented_answers(fuzz_suite: FuzzSuite, rpc: Rpc) -> None:
    """A request that is otherwise fine, with a token that is real, edited, forged or another RPC's."""
    token_fields = [f.name for f in rpc.input_type.fields if f.name.endswith(("page_token", "cursor"))]
    seeds = Seeds(page_tokens=fuzz_suite.page_tokens)
    tokens = page_tokens(seeds, fuzz_suite.page_tokens.get(rpc.path, []))
    request_class = message_factory.GetMessageClass(rpc.input_type)
    admitted = st.sampled_from(fuzz_suite.admitted.get(rpc.path) or ["admin"])

    def fuzz(data: Any) -> None:
        request = request_class(**fuzz_suite.listing_fields(rpc))
        setattr(request, data.draw(st.sampled_from(token_fields), "field"), data.draw(tokens, "token"))
        _send_and_check(fuzz_suite, rpc, data.draw(admitted, "principal"), [request.SerializeToString()])

    _run(rpc, fuzz)
    _still_well(fuzz_suite, rpc)


def test_the_fuzzer_found_every_rpc_and_real_page_tokens(fuzz_suite: FuzzSuite) -> None:
    """The discovery and the seeding worked: every service's RPCs, the common DataSubjectService
    on all four, replenishment's DeviceService, and tokens from real List calls."""
    served = {(rpc.app, rpc.method.containing_service.full_name) for rpc in RPCS}
    for app in ("consent", "profile", "recommendation", "replenishment"):
        assert (app, "najimi.privacy.v1.DataSubjectService") in served
    assert ("replenishment", "najimi.replenishment.device.v1.DeviceService") in served
    running = {
        (name, registration.descriptor.full_name, method.name)
        for name, service in fuzz_suite.services.items()
        for registration in service.running.app.registrations
        for method in registration.descriptor.methods
    }
    assert running == {(r.app, r.method.containing_service.full_name, r.method.name) for r in RPCS}
    assert len(fuzz_suite.page_tokens) >= 3, fuzz_suite.page_tokens
    assert DEVICE in fuzz_suite.admitted["/najimi.replenishment.device.v1.DeviceService/ReportTelemetry"]
