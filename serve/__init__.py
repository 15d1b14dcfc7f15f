"""The serving guard: an OpenAI-compatible endpoint in front of vLLM that scores traffic for leaked concepts."""
