"""Herald metadata role."""
