"""Exceptions with messages meant for the person at the keyboard."""


class UsageError(ValueError):
    """Bad user input (unknown name, bad value, wrong shape). The CLI prints it and exits with 2."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or from an incompatible run."""


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a loss became NaN); what was saved before stays intact."""


class RunInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C / SIGTERM; the message says which checkpoint holds the run.

    A ``KeyboardInterrupt``, so that code which catches that for a Ctrl-C keeps working.
    """

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.signum = signum


class EnvError(TrainingError):
    """An environment failed while stepping or resetting; the message names the env and the step."""
