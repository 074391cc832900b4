"""VLM judges, reflector and refiner: OpenAI-compatible endpoints (client.py, judges.py) and local
transformers models (local.py). Importing this package registers them; nothing heavy loads here."""

from . import registry  # noqa: F401  (registers the components by name)
