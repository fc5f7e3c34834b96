"""Model families: where each supported Hugging Face model merges."""
