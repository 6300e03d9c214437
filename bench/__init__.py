"""Herald benchmarks."""
