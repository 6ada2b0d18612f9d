"""Prompts as AUTOMATIC1111 and ComfyUI users write them: the syntax here (MLX-free), the encoding in
`prompts.weighted` (`encode_prompt_weighted`, in front of the same PromptEncoder)."""

from .syntax import MAX_LORA_TAGS, MAX_NESTING, MAX_WEIGHT, extract_lora_tags, is_break, parse_attention

__all__ = ["MAX_LORA_TAGS", "MAX_NESTING", "MAX_WEIGHT", "extract_lora_tags", "is_break", "parse_attention"]
