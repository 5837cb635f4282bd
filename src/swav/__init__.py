"""SwAV self-supervised pretraining (Caron et al. 2020) in native PyTorch."""
__version__ = "0.1.0"
