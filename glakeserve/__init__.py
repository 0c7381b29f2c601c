"""GlakeServe: an LLM inference engine whose KV cache lives in vTensors."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from glakeserve import LLM, SamplingParams` without importing torch for `glake --version`
    if name == "LLM":
        from glakeserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from glakeserve.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
