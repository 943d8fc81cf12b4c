"""Reproduce the Nous-Hermes-Llama2 fine-tune on your own data mix (see training/README.md).

sources.py (read and normalise; source_formats.py) -> data.py (clean, mix, report) ->
tokenize.py (bot.prompt text, masks, EOS) -> packing.py -> plan.py (which rows each step reads)
-> train.py (the loop; model.py builds and shards the model, checkpoint.py saves and resumes,
flops.py counts MFU) -> export.py (Hugging Face folder for MODEL=...). Imports go one way: export.py never imports train.py.
"""
