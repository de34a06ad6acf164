"""Errors a user can cause. Each message names the file and the tensor, says what was expected
and what was found, and how to fix it. The CLI prints `Error: <message>` and exits 1."""

from __future__ import annotations


class LoraMergeError(Exception):
    """Base class for every user-caused problem. `problems` holds extra lines (one per problem)
    when several were collected at once, so the user fixes them all in one round."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.problems = list(problems or [])

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        shown = self.problems[:25]
        lines = [self.message] + [f"  - {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


class CheckpointError(LoraMergeError):
    """The base checkpoint cannot be read (missing, truncated, not a supported format)."""


class AdapterError(LoraMergeError):
    """The adapter cannot be read or uses a feature whose math is not supported."""


class PlanError(LoraMergeError):
    """Adapter and base do not fit together (targets, shapes, dtypes)."""


class OutputError(LoraMergeError):
    """The output path is unsafe or unusable (would clobber inputs or existing data)."""


class NumericsError(LoraMergeError):
    """A merged value is not finite, or cannot be represented in the output dtype."""


class OnnxError(LoraMergeError):
    """An ONNX graph cannot be read, does not fit the adapters, or fails validation."""


class UsageError(LoraMergeError):
    """Options that contradict each other. The CLI exits 2 for these."""


class HubError(LoraMergeError):
    """A Hugging Face Hub id that cannot be resolved: no such repo or revision, not in the cache
    while offline, or a cached snapshot that lacks files."""
