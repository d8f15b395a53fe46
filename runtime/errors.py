"""The one error type users see: a message of one line and the exit code it deserves."""


class MoeError(Exception):
    """A failure a user can cause or meet: bad input (exit 2) or a runtime failure (exit 1)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message
