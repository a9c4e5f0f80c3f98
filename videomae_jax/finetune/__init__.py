"""Fine-tuning: config, init loading, the classifier step, features and evaluation."""
