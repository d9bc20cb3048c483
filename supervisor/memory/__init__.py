"""The agents' shared memory: the store, its history and backup, context retrieval and embeddings. The steward in the loop is features/steward.py."""
