"""The daemon: one loop that owns all state, and the features it starts."""
