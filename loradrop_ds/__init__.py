"""loradrop_ds: LoRA-drop fine-tuning of LLaMA-family models on DeepSpeed ZeRO-3.

The algorithm (``importance``) is pure; ``distributed`` is the thin collective layer;
``model``, ``lora``, ``data``, ``engine``, ``training``, ``checkpoint``,
``run_checkpoint`` and ``export`` are the components ``launch/train.py`` and
``launch/export.py`` put together.
"""

__version__ = "0.1.0"
