"""tpi: tensor-parallel LLM inference across small machines (shared library)."""

__version__ = "0.1.0"
