"""The embedded default: a generated world of fictional people and a small Llama that knows it."""
