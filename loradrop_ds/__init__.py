"""loradrop_ds: LoRA-drop fine-tuning of LLaMA-family models on DeepSpeed ZeRO-3.

The algorithms (``importance`` for LoRA-drop, ``prune_algorithm`` for LoRAPrune) are pure;
``distributed`` is the thin collective layer; ``preflight``, ``model``, ``lora``, ``data``,
``engine``, ``training``, ``adapter_io``, ``run_checkpoint``, ``export`` and ``planner`` are the
components ``launch/train.py``, ``launch/export.py`` and ``launch/plan.py`` put together. The
README's Layout section lists every module.
"""

__version__ = "0.1.0"
