"""`reflectionflow serve`: the project's judges behind an OpenAI-compatible HTTP endpoint."""

from .server import Judges, JudgeServer, JudgeService, ServeError, world_judges

__all__ = ["JudgeServer", "JudgeService", "Judges", "ServeError", "world_judges"]
