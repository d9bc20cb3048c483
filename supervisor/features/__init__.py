"""Optional features as they plug into the daemon's loop and control socket: health, the output gate and breaker, the memory steward, metrics, status."""
