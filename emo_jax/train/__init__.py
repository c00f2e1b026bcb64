"""Training: `python -m emo_jax.train` (the CLI, __main__.py) runs `loop.train_and_evaluate`.

Modules: step.py (TrainState, jitted train/eval steps, gradient accumulation), optimizer.py
(AdamW + schedule), loss.py (the objective), checkpoint.py (Orbax checkpoints, restore_model /
save_model), feed.py (this process's rows of every batch, resumable), metrics.py (console,
TensorBoard, metrics.jsonl, MFU), loop.py (the loop, evaluation, preemption).
"""
