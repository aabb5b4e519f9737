"""Side commands: loss-curve comparison, the demo, benchmarks against the reference."""
