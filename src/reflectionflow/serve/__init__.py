"""`reflectionflow serve`: the project's judges behind an OpenAI-compatible HTTP endpoint."""

from .server import BatchOptions, Judges, JudgeServer, JudgeService, ServeError, world_judges

__all__ = ["BatchOptions", "JudgeServer", "JudgeService", "Judges", "ServeError", "world_judges"]
