"""Attacks on an unlearned export: what survives deployment (quantization) and a few steps of fine-tuning."""
