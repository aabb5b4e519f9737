"""The model: `ModelConfig` and presets, the Flax linen transformer, the loss, and weights in and
out (reference `.pth`, safetensors, Hugging Face)."""
