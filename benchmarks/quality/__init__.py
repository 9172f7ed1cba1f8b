"""The DeepSeekMoE quality study (issue 8): ``python -m benchmarks.quality.run --help``."""
