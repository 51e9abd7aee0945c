"""Prompt templates: the judge rubric and the few-shot prompt-generation template."""

from srlm.prompts.templates import PromptTemplate, load_template

__all__ = ["PromptTemplate", "load_template"]
