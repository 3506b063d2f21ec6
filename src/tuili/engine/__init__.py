"""One model's inference loop. The server's door into it is `AsyncEngine` and the types it
yields (outputs.py); nothing outside `tuili.engine` reaches the modules behind them."""
from .async_engine import AsyncEngine, RequestStream
from .outputs import (CompletionDelta, CompletionOutput, EngineDeadError, EngineError, EngineShutdownError,
                      InvalidRequestError, QueueFullError, RequestDelta, RequestOutput, TokenLogprob)

__all__ = ["AsyncEngine", "RequestStream", "CompletionDelta", "CompletionOutput", "EngineDeadError", "EngineError",
           "EngineShutdownError", "InvalidRequestError", "QueueFullError", "RequestDelta", "RequestOutput",
           "TokenLogprob"]
