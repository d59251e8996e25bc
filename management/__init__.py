"""The management service (seed 004): identity (users, tokens), the model catalog over the one
live registry, the lifecycle with persisted desired state, and per-model logs. Domain code: it
works in domain types and calls the store; it knows nothing of HTTP."""
