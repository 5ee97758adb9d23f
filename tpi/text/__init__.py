"""Text <-> token ids: the tokenizer and chat templates."""
