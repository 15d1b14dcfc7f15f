"""align-then-unlearn: make a language model forget chosen concepts, export it for vLLM, guard the endpoint."""

__version__ = "0.1.0"
