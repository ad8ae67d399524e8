"""A multi-node kind cluster built offline: binaries and node image (``build``), the cluster (``cluster``)."""
