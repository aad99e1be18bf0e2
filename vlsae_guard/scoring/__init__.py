"""Benchmark scoring as pure functions: prompt, parse, score, aggregate (no model code here)."""
