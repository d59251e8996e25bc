"""Monitoring (issue 11, data half): machine and GPU readers, the per-request records and their
batched writer, the sampler that keeps the history, the history queries, the live configuration and
the running models' health probe. Domain code: no HTTP here; the database through store/."""
