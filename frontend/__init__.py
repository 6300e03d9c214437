"""Herald frontend role."""
