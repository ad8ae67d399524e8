"""colo-agent: runs a guest and replicates it to a peer agent, COLO style."""

__version__ = "0.1.0"
