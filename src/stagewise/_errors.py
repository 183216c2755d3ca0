"""The root of every error Stagewise raises on purpose; at the bottom of the layering (imports nothing of ours).

Each package's errors derive from :class:`StagewiseError` *and* from the builtin they refine, so ``except
StagewiseError`` catches anything we raised on purpose while ``except ValueError`` (or ``TimeoutError``...) in callers
keeps working. Exception tree::

    StagewiseError                                        catch this to catch any error Stagewise raised on purpose
    ├── ConfigError(StagewiseError, ValueError)           a setting is invalid; the message names the flag to change
    ├── SplitError(StagewiseError, ValueError)            split: the model cannot be cut as asked
    ├── CaptureError(StagewiseError, RuntimeError)        split: the forward pass cannot be captured
    ├── PackError(StagewiseError, ValueError)             split: stages that cannot travel as data (wire format)
    ├── ScheduleError(StagewiseError, ValueError)         schedule: a schedule that cannot run
    ├── PlanError(StagewiseError, ValueError)             plan: no layout fits the cluster
    ├── CommError(StagewiseError)                         comm: transport failures (tree in ``comm/_errors.py``)
    ├── StepError(StagewiseError, RuntimeError)           runtime: a schedule action failed
    ├── CheckpointError(StagewiseError)                   checkpoint: missing, incomplete or altered
    ├── WeightsError(StagewiseError, ValueError)          weights: files that do not hold what the model needs
    ├── ChannelError(StagewiseError, ConnectionError)     serve: a worker channel broke inside a frame
    └── ServeError(StagewiseError)                        serve: errors the gateway answers as HTTP (``_protocol.py``)
"""

from __future__ import annotations

__all__ = ["ConfigError", "StagewiseError"]


class StagewiseError(Exception):
    """Base class of every error Stagewise raises on purpose."""


class ConfigError(StagewiseError, ValueError):
    """A configuration value is invalid; the message names the setting (and its CLI flag) and what to change."""
