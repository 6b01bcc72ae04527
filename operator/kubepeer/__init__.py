"""Kubepeer: a Livepeer AI orchestrator's GPU fleet on Kubernetes."""

__version__ = "0.1.0"
