"""A seeded, physically motivated hot-dip galvanizing line that produces coil matrices and labels.

See ``docs/simulator.md`` for the physics, the label rule, every parameter and the drift scenarios.
"""

from ml.sim.config import LineConfig
from ml.sim.drift import SCENARIOS, DriftConfig
from ml.sim.gold import gold_set
from ml.sim.line import LineSimulator, SimCoil, coils_to_dataset
from ml.sim.products import COATINGS, DEFAULT_MIX

__all__ = [
    "COATINGS",
    "DEFAULT_MIX",
    "SCENARIOS",
    "DriftConfig",
    "LineConfig",
    "LineSimulator",
    "SimCoil",
    "coils_to_dataset",
    "gold_set",
]
