"""Herald sender role."""
