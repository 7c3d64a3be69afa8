"""Errors llmkit raises for bad input: always say what was wrong and what was expected."""


class LlmkitError(Exception):
    """Base class for every error llmkit raises on purpose."""


class ConfigError(LlmkitError, ValueError):
    """A config file, key or value is wrong."""


class CheckpointError(LlmkitError):
    """A model folder or checkpoint file is missing, corrupt or does not match the model."""


class InputError(LlmkitError, ValueError):
    """Input data (token ids, text, requests) is out of range or malformed."""
