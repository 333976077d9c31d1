"""Observability: log sinks, Prometheus metrics, the debug and profiling servers, status."""
