"""The base of every error a user can fix (bad spec, missing data, unusable backbone, ...), and the errors a
trial ends with that a retry would meet again.

The CLI prints a :class:`UserError` as one line and exits with code 2; anything else is a bug and shows a traceback.
No imports beyond the standard library: trial drivers import this module, and never torch.
"""


class UserError(Exception):
    """A problem in what the user asked for; the message names the file/key/value and the fix."""


class SearchInterrupted(KeyboardInterrupt):
    """A search stopped by Ctrl-C (SIGINT) after its state was saved; the message says how far it got
    and how to continue. The CLI prints it and exits with code 130, like any interrupted command."""


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


class GpuMemoryError(RuntimeError):
    """A trial ran out of GPU memory (the message says what to set)."""


# Result keys of a trial that ended with an error a retry would meet again: its workers report the error's message
# under its key instead of raising (Ray Train would retry them), and the trial's driver raises the error.
DIVERGED, OUT_OF_MEMORY = "diverged", "out_of_memory"
TRIAL_ERRORS = {DIVERGED: DivergenceError, OUT_OF_MEMORY: GpuMemoryError}


def raise_trial_error(metrics: dict) -> None:
    """Raise the error a trial's last report carries (see :data:`TRIAL_ERRORS`), if any."""
    for key, error in TRIAL_ERRORS.items():
        if metrics.get(key):
            raise error(metrics[key])
