"""Fencing arbiters: the lock a primary must hold to release output (see `base`)."""
