"""Evaluation: reward modelling on human-ranked replies, head-to-head comparisons, run reports."""
