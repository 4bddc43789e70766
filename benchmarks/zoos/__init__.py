"""The benchmark zoos: MiniLM text experts and SmolLM2 experts, built reproducibly on a CPU, and
the problem kinds that merge them (:mod:`benchmarks.zoos.problems`)."""
