"""Reproduce the Nous-Hermes-Llama2 fine-tune on your own data mix (see training/README.md).

data.py (normalise, clean, report) -> tokenize.py (bot.prompt text, masks, EOS) -> packing.py
-> train.py (FSDP2 loop, checkpoints) -> export.py (Hugging Face folder for MODEL=...).
"""
