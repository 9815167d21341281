"""nanochat-unsloth: nanochat's base-model pretraining, faster and leaner.

Sub-packages, one stage each:
- prep:    tokenizer training and FineWeb-Edu -> uint16 token shards (offline)
- shards:  the shard file format, the manifest, and the resumable loader
- train:   nanochat's GPT and step math in an Accelerate training loop
- convert: checkpoints to and from nanochat's base_checkpoints layout
"""

__version__ = "0.1.0"
