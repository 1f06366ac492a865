"""Text: the CLIP tokenizer with ComfyUI prompt syntax, and prompt encoding with the text encoders."""
