"""Benchmark runs as a job: a matrix of spec variants measured side by side on one machine (`steward bench`)."""
