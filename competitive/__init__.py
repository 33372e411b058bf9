"""Competitive (hard-assignment) training of mixtures of generative models."""
