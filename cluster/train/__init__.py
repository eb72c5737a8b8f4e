"""Training on Ray Train: the one loop every stage runs (loop), the one launcher that builds every
TorchTrainer (launcher), and their parts: configs, plan, session, models and placement, optimiser
and schedule, checkpoints, batches, metrics sink, fine-tuning strategies, plots.
"""
