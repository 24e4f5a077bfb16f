"""The one exception type that reaches users: a message that says what, where and what to do."""


class SkinriskError(Exception):
    """An input or configuration problem a person can fix; the CLI prints it without a traceback."""


class DataError(SkinriskError):
    """The data (metadata table or images) is not what the stage needs."""


class ParamsError(SkinriskError):
    """params.yaml or a --set override is invalid."""
