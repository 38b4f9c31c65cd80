"""Benchmarks of session start, tool calls, the event path, scale and start-up, beside peers."""
