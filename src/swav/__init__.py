"""Self-supervised pretraining in native PyTorch: SwAV (Caron et al. 2020) and its siblings DeepCluster-v2, SeLa-v2 and multi-crop SimCLR."""
__version__ = "0.1.0"
