"""The three MEG networks (energy E, generator G, statistics T), the MEG objective and latent MALA.

Plain ``nn.Module``s and pure functions: no device, rank or precision logic lives here. Their
configuration sections are in models/config.py, which imports no torch: this package's
``__init__`` imports nothing, so that loading a configuration does not load the networks.
"""
