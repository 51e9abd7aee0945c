"""Inference: the batched generation engine, its key/value cache, the judges, score parsing and model loading.

Used by the self-rewarding loop, the stand-alone commands and evaluation; imports only from ``srlm.data``,
``srlm.models`` and ``srlm.prompts`` below it.
"""
