"""cellseg: U-Net cell instance segmentation for phase-contrast microscopy."""

__version__ = "0.1.0"
