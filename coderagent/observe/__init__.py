"""Observability: log sinks now; metrics and the debug server plug in here."""
