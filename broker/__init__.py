"""Herald broker role."""
