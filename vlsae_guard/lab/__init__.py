"""Models and worlds built here, offline: tiny LLaVA checkpoints in the real layouts (tests and
the demo), the demo's inputs, and the CPU hallucination testbed. Shipped in the wheel so that the
README's demo runs on a fresh machine."""
