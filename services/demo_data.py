"""Deterministic demo data that `make run` loads through the services' own RPCs.

Every call carries a fixed request id, so loading twice changes nothing. The demo
device's token is returned only once; it is kept in <data_dir>/demo-devices.json so a
grpcurl user can act as that device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import grpc
from google.protobuf import duration_pb2
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as rec_pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as rec_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as repl_pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as repl_grpc

CUSTOMERS = [
    ("demo-aiko", "Aiko Tanaka", "aiko@example.com", 1988, "JP-13", "ja"),
    ("demo-ben", "Ben Carter", "ben@example.com", 1975, "GB-LND", "en"),
    ("demo-chloe", "Chloé Martin", "chloe@example.com", 1999, "FR-75", "fr"),
]

# (item id, title, category path, brand, price in micros of JPY, tags)
ITEMS = [
    (
        "ink-black-xl",
        "Black ink cartridge XL",
        ["office", "printing", "ink"],
        "Inkwell",
        4_200_000_000,
        ["consumable"],
    ),
    (
        "ink-colour",
        "Colour ink cartridge",
        ["office", "printing", "ink"],
        "Inkwell",
        5_100_000_000,
        ["consumable"],
    ),
    (
        "paper-a4",
        "A4 paper, 500 sheets",
        ["office", "printing", "paper"],
        "Papyra",
        900_000_000,
        ["consumable"],
    ),
    (
        "filter-std",
        "Water filter cartridge",
        ["kitchen", "water", "filters"],
        "Aqualis",
        2_800_000_000,
        ["consumable"],
    ),
    (
        "coffee-beans",
        "Single-origin coffee beans 1 kg",
        ["kitchen", "coffee", "beans"],
        "Kobe Roast",
        3_600_000_000,
        [],
    ),
    (
        "coffee-descaler",
        "Descaler for coffee machines",
        ["kitchen", "coffee", "care"],
        "Kobe Roast",
        1_200_000_000,
        ["consumable"],
    ),
    ("kettle", "Gooseneck kettle", ["kitchen", "coffee", "equipment"], "Pourwell", 9_800_000_000, []),
    ("notebook", "Dot-grid notebook", ["office", "stationery"], "Papyra", 1_500_000_000, []),
]


def _device_request() -> repl_pb.RegisterDeviceRequest:
    return repl_pb.RegisterDeviceRequest(
        request_id="demo-device-aiko-printer",
        customer_id="demo-aiko",
        manufacturer="Inkwell",
        model="IW-200",
        kind="printer",
        serial_number="IW200-0001",
        display_name="Aiko's printer",
        slots=[
            repl_pb.Slot(
                slot_id="black",
                display_name="Black ink",
                item_id="ink-black-xl",
                capacity=100.0,
                unit="percent",
                reorder_quantity=1,
                unit_price_micros=4_200_000_000,
                currency_code="JPY",
                policy=repl_pb.SLOT_POLICY_NOTIFY_ONLY,
                lead_time=duration_pb2.Duration(seconds=2 * 86400),
            ),
            repl_pb.Slot(
                slot_id="colour",
                display_name="Colour ink",
                item_id="ink-colour",
                capacity=100.0,
                unit="percent",
                reorder_quantity=1,
                unit_price_micros=5_100_000_000,
                currency_code="JPY",
                policy=repl_pb.SLOT_POLICY_NOTIFY_ONLY,
                lead_time=duration_pb2.Duration(seconds=2 * 86400),
            ),
        ],
    )


def load_demo_data(addresses: Mapping[str, str], admin_token: str, data_dir: Path | None = None) -> str:
    """Loads the demo data through the running services; returns a one-line summary."""
    metadata = (("authorization", f"Bearer {admin_token}"),)
    with grpc.insecure_channel(addresses["NAJIMI_PROFILE_ADDRESS"]) as channel:
        profiles = profile_grpc.ProfileServiceStub(channel)
        for customer_id, name, email, birth_year, region, language in CUSTOMERS:
            profiles.CreateCustomer(
                profile_pb.CreateCustomerRequest(
                    request_id=f"demo-{customer_id}",
                    customer_id=customer_id,
                    customer=profile_pb.Customer(
                        display_name=name,
                        email=email,
                        birth_year=birth_year,
                        region=region,
                        language_code=language,
                    ),
                ),
                metadata=metadata,
                timeout=10,
            )
    with grpc.insecure_channel(addresses["NAJIMI_RECOMMENDATION_ADDRESS"]) as channel:
        rec_grpc.RecommendationServiceStub(channel).UpsertItems(
            rec_pb.UpsertItemsRequest(
                request_id="demo-catalog-v1",
                items=[
                    rec_pb.Item(
                        item_id=item_id,
                        title=title,
                        category_path=path,
                        brand=brand,
                        price_micros=price,
                        currency_code="JPY",
                        tags=tags,
                        available=True,
                    )
                    for item_id, title, path, brand, price, tags in ITEMS
                ],
            ),
            metadata=metadata,
            timeout=10,
        )
    with grpc.insecure_channel(addresses["NAJIMI_REPLENISHMENT_ADDRESS"]) as channel:
        registered = repl_grpc.ReplenishmentServiceStub(channel).RegisterDevice(
            _device_request(), metadata=metadata, timeout=10
        )
    if data_dir is not None and registered.device_token:
        path = data_dir / "demo-devices.json"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump({f"device:{registered.device.device_id}": registered.device_token}, file, indent=2)
    return (
        f"{len(CUSTOMERS)} customers, {len(ITEMS)} items, device {registered.device.device_id} "
        f"(token in demo-devices.json)"
    )
