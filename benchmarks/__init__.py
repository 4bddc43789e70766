"""Benchmarks of adamerge (speed, memory, accuracy on real models) and the zoos they merge."""
