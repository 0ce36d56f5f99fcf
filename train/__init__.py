"""Training and evaluation entry points: gate distillation, fine-tuning, perplexity evaluation."""
