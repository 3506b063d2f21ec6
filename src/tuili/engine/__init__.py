"""One model's inference loop. The server's door into it is `AsyncEngine` and the types it
yields (outputs.py); nothing outside `tuili.engine` reaches the modules behind them."""
from .async_engine import AsyncEngine, RequestStream
from .kv_cache import TIERS
from .tiers import MOVES as TIER_MOVES
from .outputs import (CompletionDelta, CompletionOutput, EngineDeadError, EngineError, EngineShutdownError,
                      InvalidRequestError, QueueFullError, RequestDelta, RequestOutput, TokenLogprob)

__all__ = ["AsyncEngine", "RequestStream", "CompletionDelta", "CompletionOutput", "EngineDeadError", "EngineError",
           "EngineShutdownError", "InvalidRequestError", "QueueFullError", "RequestDelta", "RequestOutput",
           "TokenLogprob", "TIERS", "TIER_MOVES"]
