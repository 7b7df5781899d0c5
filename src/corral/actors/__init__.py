"""Behaviour: the actor kernel, supervision, resilience and the model actors."""
