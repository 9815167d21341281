"""nanochat-unsloth: nanochat's base-model pretraining, faster and leaner.

Sub-packages (docs/ARCHITECTURE.md has the import floors between them):
- tokenizer: the RustBPE tokenizer every stage reads (a module)
- prep:      tokenizer training and FineWeb-Edu -> uint16 token shards (offline)
- shards:    the shard file format, the manifest, and the resumable loader
- model:     nanochat's GPT, its kernel sets, memory modes, FP8, and build_model
- train:     the run: nanochat's step math in an Accelerate training loop, checkpoints
- eval:      bits per byte and samples; `nanochat-unsloth eval`
- convert:   checkpoints to and from nanochat's base_checkpoints layout
"""

__version__ = "0.1.0"
