"""The circuit breaker's logic: states, rules, windows, settings, defaults, snapshot. Its place in the loop is features/output_gate.py."""
