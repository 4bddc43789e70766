"""Built-in model zoos for demos, tests and benchmarks."""
