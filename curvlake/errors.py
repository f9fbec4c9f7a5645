"""Exceptions that curvlake raises for problems a user can fix."""


class CurvlakeError(Exception):
    """Base class of curvlake's own errors."""


class UserInputError(CurvlakeError, ValueError):
    """Bad input from a user: the message names the value and what is allowed."""


class LakeError(CurvlakeError):
    """A lake or artifact is missing, incomplete, corrupted or of an incompatible format."""


class ArtifactNotFoundError(LakeError, KeyError):
    """No artifact with that id in the lake."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IncompleteArtifactError(LakeError):
    """The artifact exists but is not complete (still writing, killed, or failed)."""


class SchemaError(LakeError):
    """A stored artifact or dataset does not match its schema."""


class CorruptChunkError(LakeError):
    """A stored chunk failed its checksum."""
