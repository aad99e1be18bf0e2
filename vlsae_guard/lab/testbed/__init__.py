"""The CPU hallucination testbed (issue 8): a generated world with a planted co-occurrence bias,
a LLaVA trained on it from scratch, and the guard A/B on it (``benchmarks/testbed.py``)."""
