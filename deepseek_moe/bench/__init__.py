"""The microbenchmark CLI ``deepseek-moe-bench`` (also ``python -m deepseek_moe.bench``)."""
from .cli import main

__all__ = ["main"]
