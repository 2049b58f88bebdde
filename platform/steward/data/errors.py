"""DataError: data that cannot be used as the spec asks, named by the spec field to change."""

from steward.errors import StewardError


class DataError(StewardError):
    """A problem with the data or the `data` section; the message starts with the spec field path.

    Several problems found together are raised once, one per line, so a person fixes them in one pass.
    """

    def __init__(self, field: str, message: str, *more: tuple[str, str]):
        self.problems = [(field, message), *more]
        super().__init__("\n".join(f"{f}: {m}" for f, m in self.problems))

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Ray pickles a worker's exception to the driver; the default reduce passes only the joined message.
        return (type(self), (*self.problems[0], *self.problems[1:]))

    @classmethod
    def raise_all(cls, problems: list[tuple[str, str]]) -> None:
        """Raise one DataError carrying every (field, message) problem; do nothing when there are none."""
        if problems:
            raise cls(*problems[0], *problems[1:])
