"""The replenishment service: devices and slots, device tokens, telemetry, forecasts, orders."""
