"""distrain: distributed transfer learning on images.

Shards (WebDataset tar files with a manifest) → a streaming pipeline split evenly across DDP ranks → a pretrained
backbone with a new head and `unfreeze_depth` trainable stages → Ray Train (DDP) → Ray Tune sweeps → W&B.
The command line (`distrain --help`) is a thin layer over these modules.
"""

__version__ = "0.1.0"
