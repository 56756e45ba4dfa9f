"""Using a trained model: load_model, predict on new images, export a merged checkpoint."""
