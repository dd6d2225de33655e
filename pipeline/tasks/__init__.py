"""Task catalogue: specs, the registry, and the built-in tasks."""

from pipeline.tasks.catalogue import BUILTIN
from pipeline.tasks.spec import (METRICS_BY_KIND, SPLITS, Columns, FilesSource, HubSource, SplitFiles, TaskRegistry,
                                 TaskSpec)

__all__ = ["BUILTIN", "METRICS_BY_KIND", "SPLITS", "Columns", "FilesSource", "HubSource", "SplitFiles",
           "TaskRegistry", "TaskSpec"]
