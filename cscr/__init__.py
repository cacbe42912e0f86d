"""cscr: Cost-Spectrum Contrastive Routing (SPEC: ../shared/SPEC.md)."""

__version__ = "0.1.0"
