"""The benchmarks behind BENCHMARKS.md, run from the repository root as modules:
``python -m benchmarks.run``, ``python -m benchmarks.scale``, ``python -m benchmarks.gpu_check``."""
