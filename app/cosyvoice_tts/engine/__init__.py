"""CosyVoice2 inference engine: model stages, scheduler, KV memory, model runner and the loop that ties them."""
from .engine import Engine
from .errors import CapacityError, EngineError, InvalidRequestError, UnknownVoiceError
from .request import Request, SynthesisParams

__all__ = ["Engine", "Request", "SynthesisParams", "EngineError", "CapacityError", "InvalidRequestError",
           "UnknownVoiceError"]
