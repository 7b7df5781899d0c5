"""The harness behind `corral bench`: measurements side by side, written to benchmarks/results."""
