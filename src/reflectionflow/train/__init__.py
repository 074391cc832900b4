"""Trainers: the shared flow-matching loop and the world's models."""
