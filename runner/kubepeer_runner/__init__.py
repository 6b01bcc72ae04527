"""The Kubepeer runner: the Livepeer ai-runner HTTP API on torch, diffusers and transformers."""

__version__ = "0.1.0"
