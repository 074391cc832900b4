"""Backends: world (embedded Shapes world) and real-scale ones."""
