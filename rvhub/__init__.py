"""rvhub: extract, compress, publish and apply reasoning vectors (v = θ_RL − θ_SFT)."""

__version__ = "0.1.0"
