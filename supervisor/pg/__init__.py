"""State shared by several hosts in PostgreSQL (the `storage: {backend: postgresql}` option).

db          connections: timeouts, the schema's search_path, LISTEN for wake-up hints
migrations  the versioned schema, applied at start or by `watchkeeper migrate`
leases      the leader lease (fencing token), task-lock leases, host liveness
claims      scheduled slots (on the database's clock) and the firing claims that make one
            host run each firing
agents      run leases (one instance of an agent in the cluster), pause flags, cool-downs,
            hand-offs: the SQL
agent_sync  the same, seen from this daemon: claims before a start, overlap across hosts,
            pulling peers' changes
memory      the steward's store in PostgreSQL, writes serialised by the database
breaker     the circuit breaker fed with every host's events, one decision at a time
cluster     the feature (core/feature.py) that plugs all of it into the daemon's loop
"""
