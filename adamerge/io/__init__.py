"""Files: safe reading (safetensors first, ``weights_only=True`` otherwise), atomic writes,
sharded safetensors and memory-mapped features, the cache root. Imports nothing else of adamerge."""
