"""drorebel: distributionally robust REBEL (chi^2, KL, Wasserstein) for LLM alignment."""

__version__ = "0.1.0"
