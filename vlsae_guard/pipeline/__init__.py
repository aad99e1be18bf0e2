"""From a LLaVA model to a trained VL-SAE: image-caption pairs, collection into a sharded
store, and training."""
