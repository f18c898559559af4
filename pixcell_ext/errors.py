"""The one base class of the errors a user can act on: the scripts print their message instead of a traceback.

Each sub-package raises its own (a bad tile, a gated model, a LoRA that does not fit, a generation folder of another
configuration, an output folder that cannot be used); deriving them all from one leaf class lets the scripts' shared
`console.run_main` catch them without importing the packages that define them.
"""


class ExplainedError(Exception):
    """An error whose message already says what went wrong and what to do about it."""
