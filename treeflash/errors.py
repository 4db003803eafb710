"""The one exception type users see.

Every error caused by what a user passed in (a path, a checkpoint, a prompt, a flag) is raised as
`TreeFlashError` at the boundary where the input enters, with one sentence that names the problem and
the fix. Internal invariants use plain `assert`s; they are bugs, not user errors.
"""


class TreeFlashError(ValueError):
    """A problem with the user's input, described in one sentence that says how to fix it."""
