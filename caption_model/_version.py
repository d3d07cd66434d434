"""The library version: in pyproject.toml's metadata and in every checkpoint's config.json."""

__version__ = "0.3.0"
