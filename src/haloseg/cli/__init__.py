"""Command-line interface: ``haloseg demo | bench``."""
