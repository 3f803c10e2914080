"""Using a trained model: `evaluate` (exact-once on a shard split, in-process or over Ray workers), `predict`
(files, folders, or shards as a Ray Data job), `export` (TorchScript, ONNX, safetensors, each checked). All of them
read only the model/ folder a run leaves (distrain.models.folder)."""
