"""The agent's engines: a primary that checkpoints its guest, a secondary that keeps its image."""
