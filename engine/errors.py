class EngineError(Exception):
    """An operation that cannot be done, with a one-line message meant for the user."""
