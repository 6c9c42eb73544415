"""Evaluation: fact-tracing metrics, tail-patch, baselines, reports."""
