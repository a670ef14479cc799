"""tcr_mirror.control."""
