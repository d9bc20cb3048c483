"""The daemon's own records (SQLite under STATE_DIR), the `storage:` settings and the state directory's modes."""
