"""tcr-mirror: a node-local, peer-to-peer caching mirror for TCR."""

__version__ = "0.1.0"
