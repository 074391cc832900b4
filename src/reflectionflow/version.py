"""The package's version (pyproject.toml's), on the ground floor: config.json records it, --version prints it."""

__version__ = "0.1.0"
