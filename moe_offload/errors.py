"""One error type for everything a user can get wrong: the CLI prints its message as one line."""


class MoeError(Exception):
    """A clear, user-facing failure. `exit_code` 2 is a usage error, 1 a runtime error."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(MoeError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=2)
