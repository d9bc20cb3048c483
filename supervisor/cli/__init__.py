"""The `watchkeeper` command: operator verbs, the agents' cheap verbs, views, top."""
