"""Errors the command-line tools turn into a one-paragraph message instead of a traceback."""


class UserFacingError(Exception):
    """A problem the user can fix (data, flags, checkpoint); its message says how."""


class DataError(UserFacingError):
    """MNIST files that are missing, unreadable, corrupt or not the official ones."""


class OutputError(UserFacingError):
    """A file or directory that cannot be written: a parent that is a file, no permission, no space."""


class CheckpointError(UserFacingError):
    """A checkpoint that cannot be read or does not belong to the run being resumed."""


class TrainingDivergedError(UserFacingError):
    """The loss became NaN or infinite; continuing would only write garbage."""
