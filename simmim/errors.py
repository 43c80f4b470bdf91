"""The error every layer raises for a setting that cannot work (command lines print it as one ``error:`` line)."""

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe key, an override or an argument that cannot work; the message names it and says what to change."""
