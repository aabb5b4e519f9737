"""Using a trained model: generation (`generate`, `chat`) and reply text."""
