"""Benchmarks: each loads its data, builds training examples and questions, and scores answers."""
