"""Evaluation: metrics, evaluation runs and reports."""
