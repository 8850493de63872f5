"""Quantized storage formats: how stored bytes that are not plain values become values.

:mod:`vramfx.quant.ggml` holds the GGML block formats of GGUF files and their torch kernels;
:mod:`vramfx.quant.decoders` the per-weight decoders every engine calls in its cast step.
"""
