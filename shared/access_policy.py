"""The suite's access policy: which principal may call which RPC, for every RPC of every service.

Every service takes its rules from POLICY (shared/server.py Registration); a service that
registers an RPC without a rule here refuses to start. The README's "Who may call what"
section is generated from it: `python -m shared.access_policy --markdown`.

Least privilege: `admin` may call everything; only customer-facing back ends act for a
customer (record or withdraw consent, create data-subject requests, manage profiles,
devices and orders); each internal service reaches exactly the RPCs its job calls.
Rules that depend on the request are enforced where the request is read, and listed in
INLINE_RULES so the README states them too.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.descriptor import ServiceDescriptor
from najimi.consent.v1 import consent_service_pb2
from najimi.privacy.v1 import data_subject_service_pb2
from najimi.profile.v1 import profile_service_pb2
from najimi.recommendation.v1 import recommendation_service_pb2
from najimi.replenishment.device.v1 import device_service_pb2
from najimi.replenishment.v1 import replenishment_service_pb2

from shared.auth import AccessRule


@dataclass(frozen=True)
class Callers:
    """A named set of principals that the policy grants RPCs to."""

    name: str
    principals: tuple[str, ...]
    description: str


CUSTOMER_FACING = Callers(
    "customer-facing",
    ("service:storefront", "service:store", "service:crm"),
    "act for a customer: storefront back ends, store and POS systems, the CRM",
)
CONSENT_ENFORCING = Callers(
    "consent-enforcing",
    ("service:profile", "service:recommendation", "service:replenishment"),
    "the suite's services that enforce consent: they check it and follow its change feed",
)
RECOMMENDER = Callers(
    "service:recommendation",
    ("service:recommendation",),
    "the recommender: follows profile's interaction feed, reads customers for a purpose",
)
CONSENT = Callers(
    "service:consent", ("service:consent",), "carries out data-subject requests in every service"
)
STOREFRONT = Callers("service:storefront", ("service:storefront",), "shows recommendations to customers")
CATALOG = Callers("service:catalog", ("service:catalog",), "the catalog feed: writes the item catalog")
FULFILMENT = Callers("service:fulfilment", ("service:fulfilment",), "ships orders, follows the order feed")
CAMPAIGN = Callers("service:campaign", ("service:campaign",), "campaign tools: read recommendations")
DEVICES = Callers("device", ("device:*",), "one IoT device, for its own device only")
# Listed in the README in this order; admin is not a group: it may call every RPC.
CALLERS = (
    CUSTOMER_FACING,
    CONSENT_ENFORCING,
    RECOMMENDER,
    CONSENT,
    STOREFRONT,
    CATALOG,
    CAMPAIGN,
    FULFILMENT,
    DEVICES,
)


@dataclass(frozen=True)
class Rule:
    """Who may call one RPC, besides admin."""

    callers: tuple[Callers, ...]

    @property
    def access(self) -> AccessRule:
        return frozenset({"admin", *(p for group in self.callers for p in group.principals)})


def callers(*groups: Callers) -> Rule:
    return Rule(groups)


ADMIN_ONLY = callers()
_CUSTOMER = callers(CUSTOMER_FACING)
_CONSENT_READERS = callers(CUSTOMER_FACING, CONSENT_ENFORCING)
_FEED = callers(CONSENT_ENFORCING)
_PROFILE_READERS = callers(CUSTOMER_FACING, RECOMMENDER)
_CATALOG_WRITERS = callers(CATALOG)
_CATALOG_READERS = callers(STOREFRONT, CAMPAIGN, CATALOG)
_RECOMMENDATION_READERS = callers(STOREFRONT, CAMPAIGN)
_ORDER_READERS = callers(CUSTOMER_FACING, FULFILMENT)

CONSENT_SERVICE = "najimi.consent.v1.ConsentService"
PROFILE_SERVICE = "najimi.profile.v1.ProfileService"
RECOMMENDATION_SERVICE = "najimi.recommendation.v1.RecommendationService"
REPLENISHMENT_SERVICE = "najimi.replenishment.v1.ReplenishmentService"
DEVICE_SERVICE = "najimi.replenishment.device.v1.DeviceService"
DATA_SUBJECT_SERVICE = "najimi.privacy.v1.DataSubjectService"

POLICY: dict[str, dict[str, Rule]] = {
    CONSENT_SERVICE: {
        # The vocabulary: read by the consent caches and by apps that ask for consent.
        "ListPurposes": _CONSENT_READERS,
        "ListDataCategories": _CONSENT_READERS,
        "CreatePurpose": ADMIN_ONLY,
        "CreateDataCategory": ADMIN_ONLY,
        "CreatePrivacyNotice": ADMIN_ONLY,
        "GetPrivacyNotice": _CUSTOMER,
        "ListPrivacyNotices": _CUSTOMER,
        # Recording consent is the customer's act, through an app that faces them.
        "GrantConsent": _CUSTOMER,
        "WithdrawConsent": _CUSTOMER,
        "SetConsents": _CUSTOMER,
        "GetConsentState": _CONSENT_READERS,
        "ListConsentHistory": _CUSTOMER,
        "CheckConsent": _CONSENT_READERS,
        "BatchCheckConsent": _CONSENT_READERS,
        "GetConsentReceipt": _CUSTOMER,
        "VerifyReceipt": _CUSTOMER,
        "ListAuditEntries": ADMIN_ONLY,
        "VerifyAuditLog": ADMIN_ONLY,
        # The change feed every consent cache follows (shared/consent_cache.py).
        "ListConsentChanges": _FEED,
        "WatchConsentChanges": _FEED,
        "ExplainDataUse": _CUSTOMER,
        "CreateDataSubjectRequest": _CUSTOMER,
        "GetDataSubjectRequest": _CUSTOMER,
        "ListDataSubjectRequests": _CUSTOMER,
    },
    PROFILE_SERVICE: {
        "CreateCustomer": _CUSTOMER,
        "GetCustomer": _PROFILE_READERS,
        "UpdateCustomer": _CUSTOMER,
        "ListCustomers": _PROFILE_READERS,
        "LinkIdentity": _CUSTOMER,
        "UnlinkIdentity": _CUSTOMER,
        "ListIdentities": _CUSTOMER,
        # E-mail and phone look-ups: only for those who act for the customer.
        "ResolveIdentity": _CUSTOMER,
        "MergeCustomers": _CUSTOMER,
        "IngestEvents": _CUSTOMER,
        "StreamEvents": _CUSTOMER,
        "ListEvents": _CUSTOMER,
        # Traits serve personalize.profiling; the recommender uses its own features (README, Architecture).
        "GetTraits": _CUSTOMER,
        "ListInteractions": callers(RECOMMENDER),
        "WatchInteractions": callers(RECOMMENDER),
    },
    RECOMMENDATION_SERVICE: {
        "UpsertItems": _CATALOG_WRITERS,
        "GetItem": _CATALOG_READERS,
        "ListItems": _CATALOG_READERS,
        "DeleteItem": _CATALOG_WRITERS,
        "Recommend": _RECOMMENDATION_READERS,
        "BatchRecommend": _RECOMMENDATION_READERS,
        "SimilarItems": _RECOMMENDATION_READERS,
        "TrainModel": ADMIN_ONLY,
        "GetTrainingRun": _RECOMMENDATION_READERS,
        "GetModel": _RECOMMENDATION_READERS,
        "ListModels": _RECOMMENDATION_READERS,
        "ActivateModel": ADMIN_ONLY,
        "GetModelEvaluation": _RECOMMENDATION_READERS,
    },
    REPLENISHMENT_SERVICE: {
        "RegisterDevice": _CUSTOMER,
        "GetDevice": _CUSTOMER,
        "ListDevices": _CUSTOMER,
        "UpdateDevice": _CUSTOMER,
        "DeregisterDevice": _CUSTOMER,
        "RotateDeviceToken": _CUSTOMER,
        "CreateSlot": _CUSTOMER,
        "GetSlot": _CUSTOMER,
        "ListSlots": _CUSTOMER,
        "UpdateSlot": _CUSTOMER,
        "DeleteSlot": _CUSTOMER,
        # Customer controls: pausing stops orders, not telemetry.
        "PauseDevice": _CUSTOMER,
        "ResumeDevice": _CUSTOMER,
        "PauseSlot": _CUSTOMER,
        "ResumeSlot": _CUSTOMER,
        "GetSlotForecast": _CUSTOMER,
        "ReplenishSlot": _CUSTOMER,
        "GetOrder": _ORDER_READERS,
        "ListOrders": _ORDER_READERS,
        "CancelOrder": _CUSTOMER,
        # Order transitions are fulfilment's (AIP-136 custom methods).
        "ShipOrder": callers(FULFILMENT),
        "DeliverOrder": callers(FULFILMENT),
        "RejectOrder": callers(FULFILMENT),
        "ListOrderEvents": callers(FULFILMENT),
        "WatchOrderEvents": callers(FULFILMENT),
        # The slot feed is for customer apps.
        "ListSlotEvents": _CUSTOMER,
        "WatchSlotEvents": _CUSTOMER,
    },
    # Each handler also checks that the device named is the caller's own (check_own_device).
    DEVICE_SERVICE: {
        "ReportTelemetry": callers(DEVICES),
        "StreamTelemetry": callers(DEVICES),
        "GetForecast": callers(DEVICES),
        "Replenish": callers(DEVICES),
    },
    # Every service registers it (shared/data_subject.py); consent calls it for each request.
    DATA_SUBJECT_SERVICE: {
        "ExportCustomerData": callers(CONSENT),
        "EraseCustomerData": callers(CONSENT),
    },
}

# Where each service of the table is served (the README names it).
SERVED_BY = {
    CONSENT_SERVICE: "consent",
    PROFILE_SERVICE: "profile",
    RECOMMENDATION_SERVICE: "recommendation",
    REPLENISHMENT_SERVICE: "replenishment",
    DEVICE_SERVICE: "replenishment",
    DATA_SUBJECT_SERVICE: "every service",
}
DESCRIPTORS: dict[str, ServiceDescriptor] = {
    service.full_name: service
    for module in (
        consent_service_pb2,
        profile_service_pb2,
        recommendation_service_pb2,
        replenishment_service_pb2,
        device_service_pb2,
        data_subject_service_pb2,
    )
    for service in module.DESCRIPTOR.services_by_name.values()
}

# Principals that see PII unmasked in profile responses (the proto: "by default only admin").
PII_READERS = frozenset({"admin"})
# Principals that must bind every customer read to a purpose (GetCustomerRequest.purpose).
PURPOSE_BOUND_READERS = frozenset(RECOMMENDER.principals)

# Rules that depend on the request, each enforced in the handler named.
INLINE_RULES = (
    "A device may name only its own `device_id`; another is `PERMISSION_DENIED` (reason "
    "`DEVICE_MISMATCH`; `services/replenishment/devices.py`).",
    "A service principal sees only the data-subject requests it created; admin sees all "
    "(`services/consent/subject_requests.py`).",
    f"Profile responses show PII unmasked only to {', '.join(f'`{p}`' for p in sorted(PII_READERS))}; "
    f"{', '.join(f'`{p}`' for p in sorted(PURPOSE_BOUND_READERS))} must name a `purpose` in every "
    "customer read, and gets only what the customer consents to for it (`services/profile/servicer.py`).",
)


def rules_for(descriptor: ServiceDescriptor) -> dict[str, AccessRule]:
    """Method name -> who may call it, for one service; RuntimeError unless every RPC has a rule."""
    table = POLICY.get(descriptor.full_name, {})
    methods = {method.name for method in descriptor.methods}
    missing = sorted(methods - set(table))
    unknown = sorted(set(table) - methods)
    if missing or unknown:
        raise RuntimeError(
            f"{descriptor.full_name}: access rules missing for {missing}, unknown for {unknown} "
            "(shared/access_policy.py)"
        )
    return {name: rule.access for name, rule in table.items()}


def named_service_principals(policy: Mapping[str, Mapping[str, Rule]] = POLICY) -> list[str]:
    """Every `service:<name>` principal the policy grants an RPC to, in table order."""
    names = (
        p for rules in policy.values() for rule in rules.values() for g in rule.callers for p in g.principals
    )
    return list(dict.fromkeys(p for p in names if p.startswith("service:")))


def _callers_text(rule: Rule) -> str:
    return ", ".join(
        ["admin", *(f"`{g.name}`" if g.name.startswith("service:") else g.name for g in rule.callers)]
    )


def _rows(descriptor: ServiceDescriptor) -> list[tuple[list[str], Rule]]:
    """The service's RPCs in contract order, those with the same callers in one row."""
    rows: dict[Rule, list[str]] = {}
    table = POLICY[descriptor.full_name]
    for method in descriptor.methods:
        rows.setdefault(table[method.name], []).append(method.name)
    return [(methods, rule) for rule, methods in rows.items()]


def markdown() -> str:
    """The README's "Who may call what" table, generated from POLICY."""
    lines = [
        "`admin` (the platform team) may call every RPC. These tables are generated from",
        "`shared/access_policy.py` (`python -m shared.access_policy --markdown`), which every",
        "service reads at start-up: a service with an RPC that has no rule there does not start.",
        "A principal not listed for an RPC gets `PERMISSION_DENIED` (reason",
        "`PRINCIPAL_NOT_ALLOWED`); a missing or unknown token gets `UNAUTHENTICATED`.",
        "",
        "| callers | who they are |",
        "|---|---|",
    ]
    for group in CALLERS:
        if group.principals == (group.name,):
            lines.append(f"| `{group.name}` | {group.description} |")
        else:
            members = ", ".join(f"`{p}`" for p in group.principals).replace("device:*", "device:<id>")
            lines.append(f"| {group.name} ({members}) | {group.description} |")
    for name in POLICY:
        descriptor = DESCRIPTORS[name]
        lines += ["", f"`{name}` ({SERVED_BY[name]}):", "", "| RPC | who may call it |", "|---|---|"]
        lines += [
            f"| {', '.join(f'`{m}`' for m in methods)} | {_callers_text(rule)} |"
            for methods, rule in _rows(descriptor)
        ]
    lines += ["", "Within an RPC:", ""]
    lines += [f"- {rule}" for rule in INLINE_RULES]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README's who-may-call-what table")
    parser.parse_args(argv)
    print(markdown(), end="")


if __name__ == "__main__":
    main()
