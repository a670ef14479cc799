"""tcr_mirror.proxy."""
