"""evomerge: evolve LLM merges in memory, scored by an IRT reduced-subset estimator."""

__version__ = "0.1.0"
