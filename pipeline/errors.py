"""`ConfigError`, in a module of its own so that every component's config can import it directly.

`pipeline/config.py` assembles the root `Config` from the components' dataclasses, so a component
importing `ConfigError` from there would be a circular import whenever it is imported first.
"""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what to change."""


class TrainingError(RuntimeError):
    """The run cannot continue; the message says why and what to change."""


class ConversionError(RuntimeError):
    """Bad input files (a Hugging Face directory, a checkpoint, an output directory); the message says
    what and how to fix it. Raised by pipeline.hf_io and the checkpoint converters."""
