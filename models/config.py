"""The models' sections of a run's configuration: the networks (``model``), the entropy estimators'
settings (``train.entropy``) and latent MALA's. Kept apart from the networks so that loading a
configuration imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class MALAConfig:
    steps: int = field(default=0, metadata={"range": "[0, 1000000]"})
    step_size: float = field(default=0.01, metadata={"range": "(0, inf)"})
    temperature: float = field(default=1.0, metadata={"range": "(0, inf)"})


@dataclass
class DVConfig:
    # MINE's moving average of E_Q[e^T] over generator steps: the rate of each new batch's share.
    # The gradient of log E_Q[e^T] is E_Q[e^T dT] / E_Q[e^T]; the moving average in the denominator
    # removes most of the minibatch estimate's bias (Belghazi et al. 2018, section 3.2).
    rate: float = field(default=0.01, metadata={"range": "(0, 1]"})


@dataclass
class InfoNCEConfig:
    # Negatives per positive: x_i against z_(i+1..i+K mod n) of the same batch (no random draw); the
    # bound is at most log(K + 1), and T runs on (K + 1) x batch pairs. Must be below the per-rank batch.
    negatives: int = field(default=15, metadata={"range": "[1, 65535]"})


@dataclass
class SMILEConfig:
    # tau: the density ratio e^T on the shuffled pairs is clipped to [e^-tau, e^tau] (T to [-tau, tau]).
    clip: float = field(default=5.0, metadata={"range": "(0, inf)"})


@dataclass
class VERAConfig:
    # G's output noise sigma: learned (one scalar), kept in [noise_min, noise_max], starting at noise_init.
    noise_init: float = field(default=0.1, metadata={"range": "(0, inf)"})
    noise_min: float = field(default=0.01, metadata={"range": "(0, inf)"})
    noise_max: float = field(default=0.3, metadata={"range": "(0, inf)"})
    # The posterior xi(z | x) = N(z0, diag(eta^2)), z0 the latent that made x; eta learned on its ELBO.
    posterior_init: float = field(default=0.1, metadata={"range": "(0, inf)"})
    # Importance samples per x for the score grad_x log q(x) (VERA's default 20).
    posterior_samples: int = field(default=20, metadata={"range": "[1, 10000]"})

    def __post_init__(self) -> None:
        if not self.noise_min <= self.noise_init <= self.noise_max:
            raise ValueError(
                f"vera: noise_min <= noise_init <= noise_max must hold, got {self.noise_min}, "
                f"{self.noise_init}, {self.noise_max}"
            )


@dataclass
class EntropyConfig:
    """Each estimator's own settings (``train.entropy_estimator`` picks which one runs)."""

    dv: DVConfig = field(default_factory=DVConfig)
    infonce: InfoNCEConfig = field(default_factory=InfoNCEConfig)
    smile: SMILEConfig = field(default_factory=SMILEConfig)
    vera: VERAConfig = field(default_factory=VERAConfig)


WIDTHS = {"range": "[1, 65536]", "length": "[1, 64]"}
# The keys only one architecture reads.
ARCH_ONLY_KEYS = {
    "hidden": "mlp",
    "generator_hidden": "mlp",
    "generator_batch_norm": "mlp",
    "generator_tanh": "mlp",
    "energy_negative_slope": "mlp",
    "conv_width": "conv",
}


@dataclass
class ModelConfig:
    arch: Literal["mlp", "conv"] = "mlp"  # mlp: any shape, flattened; conv: 28x28xC and 32x32x3 images
    z_dim: int = field(default=2, metadata={"range": "[1, 65536]"})
    # MLP widths of E and T, and of G: at least one layer each.
    hidden: list[int] = field(default_factory=lambda: [512, 512, 512], metadata=WIDTHS)
    generator_hidden: list[int] = field(default_factory=lambda: [512, 512, 512], metadata=WIDTHS)
    generator_batch_norm: bool = False
    generator_tanh: bool = False  # mlp only: squash G's output to [-1, 1] (images)
    energy_negative_slope: float = field(default=0.2, metadata={"range": "[0, 1)"})  # E's and T's LeakyReLU
    # > 0: N(0, init_std) weights, zero biases (the authors used 0.02 for images)
    init_std: float = field(default=0.0, metadata={"range": "[0, inf)"})
    # conv only: first layer's channels, doubled per layer (the paper's 64; 16 for CPU runs)
    conv_width: int = field(default=64, metadata={"range": "[1, 4096]"})
    # E's and T's layers and the penalty: fused (Triton bias+LeakyReLU, gradfix convs, one-kernel penalty
    # reduction), eager (plain PyTorch), or auto (fused where the step is captured as a CUDA graph, eager
    # elsewhere: trainer/steps.py resolve_kernels says why). Same numbers, same weights.
    kernels: Literal["auto", "eager", "fused"] = "auto"

    @staticmethod
    def keys_of_another_arch(values: dict) -> list[str]:
        """The keys a configuration sets that the architecture it picks does not read (an error: a
        silently ignored width is a run that is not what its config says)."""
        arch = values.get("arch", "mlp")
        return sorted(k for k, only in ARCH_ONLY_KEYS.items() if k in values and only != arch)

    def __post_init__(self) -> None:
        if self.z_dim < 1:
            raise ValueError(f"model.z_dim must be >= 1, got {self.z_dim}")
        if self.conv_width < 1:
            raise ValueError(f"model.conv_width must be >= 1, got {self.conv_width}")
