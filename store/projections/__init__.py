"""Projections: tables derived from ``event_log`` alone, rebuilt from it at any time.

One module per projection (its rules and its table writes); ``runner`` owns checkpoints,
catch-up and rebuild.  The same ``apply`` rules serve incremental runs, rebuilds, ``verify``
and in-memory reconstructions.
"""

from .base import Projection
from .capabilities import CapabilityHistory
from .requests import RequestOutcomes
from .transitions import WorkitemTransitions
from .workitems import Workitems

# In this order: the workitems projection decides what each snapshot changes for the others.
PROJECTIONS: tuple[type[Projection], ...] = (Workitems, WorkitemTransitions, CapabilityHistory, RequestOutcomes)
