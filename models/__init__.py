"""The three MEG networks (energy E, generator G, statistics T), the MEG objective and latent MALA.

Plain ``nn.Module``s and pure functions: no device, rank or precision logic lives here.
"""

from models.factory import MEGNetworks, build_networks
from models.mala import MALAResult, latent_mala
from models.objectives import (
    energy_loss,
    generator_loss,
    gradient_penalty,
    jsd_mutual_information,
)

__all__ = [
    "MEGNetworks",
    "build_networks",
    "MALAResult",
    "latent_mala",
    "energy_loss",
    "generator_loss",
    "gradient_penalty",
    "jsd_mutual_information",
]
