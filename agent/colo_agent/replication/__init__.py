"""Checkpoint replication between a primary and a secondary agent."""
