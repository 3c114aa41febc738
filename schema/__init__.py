"""The contract producer and worker share: job specs, line formats, SQL tables, settings."""
