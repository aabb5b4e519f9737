"""The model: `ModelConfig` and presets, the Flax linen transformer, the loss, weights in and
out (reference `.pth`, safetensors, Hugging Face; run folders' checkpoints read), and the model
flags every command shares."""
