"""The replenishment service: devices and slots, device tokens, telemetry, forecasts, orders.

Two APIs: najimi.replenishment.v1.ReplenishmentService (back ends: customer-facing
services, fulfilment, admin) and najimi.replenishment.device.v1.DeviceService (devices,
each for itself). Who owns what, so that parts can be built side by side:

- devices.py, slots.py: device and slot rules (registration, tokens, settings, pause).
- store.py: every table (migrations/versions/0004_replenishment_engine.py) and the
  queries of devices and slots; the modules below add their queries beside their logic.
- telemetry.py: reading validation (skew bound, capacity, idempotency by reading_id),
  ordering by measure_time, refill detection (new consumption epoch), the per-device
  stream rate limit.
- slot_events.py: the slot feed (ListSlotEvents, WatchSlotEvents; `slot_events` table).
- forecast.py: consumption rate, reorder point, explanation (SlotForecast); pure.
- ordering.py: the decision (ReplenishOutcome), consent, limits, exactly-once creation
  (partial unique index `orders_one_open_per_slot`).
- orders.py: cancellation, the PENDING -> PLACED promotion, Ship/Deliver/Reject.
- order_feed.py: the order feed (ListOrderEvents, WatchOrderEvents; `order_events`).
- data_subject.py: export and erasure.
- servicer.py (ReplenishmentService) and device_api.py (DeviceService): thin servicers over the modules above.
"""
