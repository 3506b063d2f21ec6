"""tuili: an LLM inference server in Python on PyTorch."""
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import tuili` (and the CLI's --help) does not pay for torch model code.
    if name == "LLM":
        from .engine.llm import LLM

        return LLM
    raise AttributeError(name)
