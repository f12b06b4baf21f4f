"""The replenishment decision and exactly-once order creation (the seam other modules call).

`Ordering.consider` decides for one slot, in the order the proto documents (open order,
policy, pause, consent, need, limits) and, when everything allows, creates one PENDING
order; the partial unique index `orders_one_open_per_slot` makes a lost race an
ORDER_IN_PROGRESS. Telemetry calls it for every slot a report touched, Replenish and
ReplenishSlot for the slot they name.

First version: the interface only (every slot NOT_NEEDED); the decision is built behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

from najimi.replenishment.v1 import replenishment_service_pb2 as pb


@dataclass(frozen=True)
class SlotDecision:
    device_id: str
    slot_id: str
    outcome: int  # pb.ReplenishOutcome value; the device package uses the same numbers
    order_id: str = ""  # the order placed, or the open order for ORDER_IN_PROGRESS
    reason: str = ""  # one line for people: why this outcome


class Ordering:
    """One per process; holds the database, the consent cache, the settings and a clock."""

    async def consider(
        self,
        device_id: str,
        slot_id: str,
        *,
        trigger: int,  # pb.OrderTrigger value: AUTOMATIC (telemetry), DEVICE_REQUEST or CUSTOMER
        explicit: bool = False,  # Replenish/ReplenishSlot: order even above the reorder point
        request_id: str = "",
    ) -> SlotDecision:
        return SlotDecision(device_id, slot_id, pb.REPLENISH_OUTCOME_NOT_NEEDED, reason="not decided yet")
