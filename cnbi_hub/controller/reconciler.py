"""Moved: the engine is now the per-object phase work (phases.PhaseWork), which the embedded
runner (runner.EmbeddedRunner) and the cluster operator both drive. Kept one release for
imports of the old name."""

from .phases import PhaseWork  # noqa: F401
from .runner import EmbeddedRunner  # noqa: F401
