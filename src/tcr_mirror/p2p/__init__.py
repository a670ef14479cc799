"""tcr_mirror.p2p."""
