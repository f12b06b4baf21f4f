"""The access policy table: complete, least-privileged as the issue demands, and the README's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared import access_policy
from shared.access_policy import POLICY
from shared.auth import Principal, is_allowed
from shared.dev_tokens import DEV_PRINCIPALS
from shared.server import Registration

README = Path(__file__).resolve().parents[2] / "README.md"
CUSTOMER_FACING = {"service:storefront", "service:store", "service:crm"}
CONSENT_WRITES = {
    ("najimi.consent.v1.ConsentService", name)
    for name in ("GrantConsent", "WithdrawConsent", "SetConsents", "CreateDataSubjectRequest")
}


def allowed_rpcs(principal: str) -> set[tuple[str, str]]:
    who = Principal.parse(principal)
    return {
        (service, method)
        for service, rules in POLICY.items()
        for method, rule in rules.items()
        if is_allowed(who, rule.access)
    }


def test_every_rpc_of_every_service_has_a_rule():
    for name, descriptor in access_policy.DESCRIPTORS.items():
        assert set(POLICY[name]) == {m.name for m in descriptor.methods}
        access_policy.rules_for(descriptor)
    assert set(POLICY) == set(access_policy.DESCRIPTORS)


def test_a_service_with_an_rpc_missing_from_the_table_does_not_start(monkeypatch):
    descriptor = access_policy.DESCRIPTORS[access_policy.PROFILE_SERVICE]
    rules = dict(POLICY[access_policy.PROFILE_SERVICE])
    del rules["ResolveIdentity"]
    monkeypatch.setitem(POLICY, access_policy.PROFILE_SERVICE, rules)
    with pytest.raises(RuntimeError, match=r"missing for \['ResolveIdentity'\]"):
        Registration(descriptor, lambda servicer, server: None, object()).policy()


def test_admin_may_call_everything_and_nobody_else_may():
    every = {(service, method) for service, rules in POLICY.items() for method in rules}
    assert allowed_rpcs("admin") == every
    assert all(allowed_rpcs(p) < every for p in DEV_PRINCIPALS if p != "admin")


def test_only_customer_facing_principals_write_consent_and_create_data_subject_requests():
    for principal in DEV_PRINCIPALS:
        if principal == "admin":
            continue
        writes = allowed_rpcs(principal) & CONSENT_WRITES
        assert writes == (CONSENT_WRITES if principal in CUSTOMER_FACING else set()), principal


def test_internal_services_read_consent_through_check_state_and_the_feed():
    consent_reads = {
        ("najimi.consent.v1.ConsentService", name)
        for name in (
            "ListPurposes",
            "ListDataCategories",
            "GetConsentState",
            "CheckConsent",
            "BatchCheckConsent",
            "ListConsentChanges",
            "WatchConsentChanges",
        )
    }
    for name in ("profile", "recommendation", "replenishment"):
        consent_rpcs = {
            rpc for rpc in allowed_rpcs(f"service:{name}") if rpc[0].startswith("najimi.consent.")
        }
        assert consent_rpcs == consent_reads, name


def test_each_internal_service_reaches_only_what_its_job_calls():
    def rpcs(principal: str) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for service, method in allowed_rpcs(principal):
            found.setdefault(service.rsplit(".", 1)[-1], set()).add(method)
        return found

    consent_reads = rpcs("service:profile")["ConsentService"]
    assert rpcs("service:profile") == {"ConsentService": consent_reads}
    assert rpcs("service:replenishment") == {"ConsentService": consent_reads}
    assert rpcs("service:recommendation") == {
        "ConsentService": consent_reads,
        "ProfileService": {"GetCustomer", "ListCustomers", "ListInteractions", "WatchInteractions"},
    }
    assert rpcs("service:consent") == {"DataSubjectService": {"ExportCustomerData", "EraseCustomerData"}}
    assert rpcs("service:catalog") == {
        "RecommendationService": {"UpsertItems", "DeleteItem", "GetItem", "ListItems"}
    }
    assert rpcs("service:fulfilment") == {
        "ReplenishmentService": {
            "GetOrder",
            "ListOrders",
            "ShipOrder",
            "DeliverOrder",
            "RejectOrder",
            "ListOrderEvents",
            "WatchOrderEvents",
        }
    }
    assert set(rpcs("service:campaign")) == {"RecommendationService"}
    assert rpcs("device:dev_1") == {
        "DeviceService": {"ReportTelemetry", "StreamTelemetry", "GetForecast", "Replenish"}
    }


def test_the_recommender_cannot_resolve_identities_and_must_bind_reads_to_a_purpose():
    assert ("najimi.profile.v1.ProfileService", "ResolveIdentity") not in allowed_rpcs(
        "service:recommendation"
    )
    assert access_policy.PURPOSE_BOUND_READERS == {"service:recommendation"}
    assert access_policy.PII_READERS == {"admin"}


def test_only_consent_and_admin_call_the_data_subject_service():
    for principal in DEV_PRINCIPALS:
        data_subject = {
            rpc for rpc in allowed_rpcs(principal) if rpc[0] == access_policy.DATA_SUBJECT_SERVICE
        }
        assert bool(data_subject) == (principal in ("admin", "service:consent")), principal


def test_a_dev_token_exists_for_every_principal_the_table_names():
    named = set(access_policy.named_service_principals())
    assert named and named <= set(DEV_PRINCIPALS)
    assert {"service:catalog", "service:fulfilment", "service:campaign", *CUSTOMER_FACING} <= named


def readme_section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no section '## {heading}'"
    return match.group(1).rstrip("\n") + "\n"


def test_the_readme_table_is_the_generated_one():
    section = readme_section(README.read_text(), "Who may call what")
    assert section == access_policy.markdown(), (
        "README.md's 'Who may call what' differs from the policy: "
        "replace it with the output of `python -m shared.access_policy --markdown`"
    )


def test_the_generator_prints_the_table(capsys):
    access_policy.main(["--markdown"])
    printed = capsys.readouterr().out
    assert printed == access_policy.markdown()
    for name in POLICY:
        assert f"`{name}`" in printed
    [row] = [line for line in printed.splitlines() if "`GrantConsent`" in line]
    assert row.endswith("| admin, customer-facing |")


PROTOS = Path(__file__).resolve().parents[2] / "protos"


def proto_callers() -> dict[tuple[str, str], set[str]]:
    """(service, RPC) -> the principals its comment's "Callers:" sentence names."""
    found: dict[tuple[str, str], set[str]] = {}
    for path in sorted(PROTOS.rglob("*.proto")):
        text = path.read_text()
        package = re.search(r"^package ([\w.]+);", text, re.M)
        assert package, path
        service = ""
        comment: list[str] = []
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("//"):
                comment.append(stripped[2:].strip())
                continue
            if match := re.match(r"service (\w+) \{", stripped):
                service = f"{package.group(1)}.{match.group(1)}"
            elif match := re.match(r"rpc (\w+)\(", stripped):
                sentence = re.search(r"Callers: (.*?)\.(?:\s|$)", " ".join(comment))
                assert sentence, f"{service}.{match.group(1)} has no 'Callers:' line in {path.name}"
                names = set(re.findall(r"\b(?:service:[a-z_]+|admin|device:)", sentence.group(1)))
                found[(service, match.group(1))] = {"device:*" if n == "device:" else n for n in names}
            comment = []
    return found


def test_each_rpc_comment_names_the_callers_the_policy_allows():
    """grpcurl describe shows these comments: they must say what the policy enforces."""
    in_protos = proto_callers()
    in_policy = {
        (service, rpc): set(rule.access) for service, rules in POLICY.items() for rpc, rule in rules.items()
    }
    assert set(in_protos) == set(in_policy)
    wrong = {
        rpc: (in_protos[rpc], allowed) for rpc, allowed in in_policy.items() if in_protos[rpc] != allowed
    }
    assert not wrong, f"'Callers:' lines that differ from shared/access_policy.py (proto, policy): {wrong}"
