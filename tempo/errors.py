"""User-facing errors: one line that names the file, key or row; the CLI exits with code 2."""


class TempoError(Exception):
    """A problem with the user's input (config, data, paths), reported as one line."""


class ConfigError(TempoError):
    """An unknown key, a wrong type or an inconsistent combination of settings."""


class DataError(TempoError):
    """A data file that cannot be read or a row that cannot be used."""


class NonFiniteError(TempoError):
    """Training stopped: too many updates in a row had a non-finite loss, gradient or value."""


class ResumeError(TempoError):
    """A run cannot be resumed as asked (no checkpoint, or a config that differs from it)."""


class ConvergenceError(TempoError):
    """A build step (base model, verifier, stage 1) reached its step cap before its criterion."""


class RefillError(TempoError):
    """Groups dropped for lack of signal could not be replaced within algorithm.max_gen_batches."""
