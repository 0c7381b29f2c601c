"""GlakeServe: an LLM inference engine whose KV cache lives in vTensors."""

__version__ = "0.1.0"
