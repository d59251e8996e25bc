"""Reliability suites: hostile uploads, schema fuzzing (quick subsets of scripts/)."""
