"""Consumers of the event log: relay, projections, job dispatcher, replay tooling."""
