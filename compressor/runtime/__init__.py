"""Torch-free inference over an exported bundle: ONNX Runtime, ``tokenizers`` and numpy only.

    from compressor.runtime import Bundle
    bundle = Bundle.load("runs/x/stages/05-bundle/bundle")
    bundle.predict(["Anna works for Acme in Oslo."], tasks=["ner", "relation"])

Each task is decoded by the decoder its plugin registered (``compressor.runtime.decoders``).

Nothing in this package may import torch, transformers or onnx (a test checks ``sys.modules``).
"""

from compressor.runtime.bundle import Bundle, BundleError
from compressor.runtime.decoders import DECODERS, Decoder, WordTagDecoder, get_decoder, register_decoder
from compressor.runtime.spec import GraphSpec

__all__ = ["DECODERS", "Bundle", "BundleError", "Decoder", "GraphSpec", "WordTagDecoder", "get_decoder",
           "register_decoder"]
