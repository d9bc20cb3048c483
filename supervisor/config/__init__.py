"""Configuration: the schema (every setting once), loading YAML with errors for people, environment references, the generated reference."""
