"""Tools: the profiler (tune), the benchmark, ahead-of-time compile checks."""
