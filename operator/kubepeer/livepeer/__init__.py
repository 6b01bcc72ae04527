"""Livepeer wire facts, each stated once: pipelines, capability ids, billed units."""
