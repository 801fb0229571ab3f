"""Reading and writing Hugging Face model directories, the one place that knows their layout.

A Hugging Face model directory holds ``config.json`` (the hyperparameters, with a
``model_type``), ``model.safetensors`` (the weights, by name) and, for a model with a
tokenizer, its files (GPT-2: ``vocab.json`` and ``merges.txt``). This package maps such a
directory to tinylm's models and back:

    common.py   what every family shares: read config.json and model.safetensors (float32,
                float16 and bfloat16), check names and shapes, write a directory atomically
    gpt2.py     GPT-2: its config fields and weight names <-> ``tinylm.GPT``
    bert.py     BERT: the same for the encoder family

One module family per file. The models know nothing of files: ``tinylm.GPT`` holds a flat dict
of arrays under GPT-2's names, and only this package turns files into those arrays and back.
tinylm reads safetensors only; it never unpickles a ``pytorch_model.bin``.
"""
