"""Prompt templates: the judge rubric and the few-shot prompt-generation template."""

from srlm.prompts.templates import JUDGE_TEMPLATE, PromptTemplate, load_template

__all__ = ["JUDGE_TEMPLATE", "PromptTemplate", "load_template"]
