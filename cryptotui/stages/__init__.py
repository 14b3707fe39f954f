"""The registry of stages: name -> class, imported only when that stage runs."""

from __future__ import annotations

import importlib

from cryptotui.stages.base import Stage

# Import paths, not classes: starting one stage must not import every other stage's dependencies.
STAGES: dict[str, str] = {
    "ingest": "cryptotui.stages.ingest:IngestStage",
    "sink": "cryptotui.stages.sink:SinkStage",
    "lag": "cryptotui.stages.lag:LagStage",
    "spark": "cryptotui.stages.spark:SparkStage",
    "retention": "cryptotui.stages.retention:RetentionStage",
}


class UnknownStage(Exception):
    pass


def load_stage(name: str) -> type[Stage]:
    try:
        module_name, _, class_name = STAGES[name].partition(":")
    except KeyError:
        raise UnknownStage(f"unknown stage {name!r}; stages: {', '.join(sorted(STAGES))}") from None
    return getattr(importlib.import_module(module_name), class_name)
