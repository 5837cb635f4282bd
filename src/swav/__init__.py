"""SwAV, DeepCluster-v2 and SeLa-v2 self-supervised pretraining."""
__version__ = "0.1.0"
