"""Data for the tools: the generated shapes scenes, their questions, Karpathy-format loading, a word
tokenizer, and real captioned images fetched from Debian packages."""
