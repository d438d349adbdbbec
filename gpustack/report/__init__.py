"""Per-step statistics files and plots."""
