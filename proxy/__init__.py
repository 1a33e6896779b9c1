"""The SMTP proxy sidecar: authenticate, identify, limit, inspect, sign, relay."""
