"""Ray Tune: hyperparameter sweeps over fine-tuning (`python -m tune.sweep`). The search space and
sweep config (config), search algorithms and schedulers (search), the trial function (trial), the
results table and plot (results), and the sweep's driver with the best trial's publish (driver).
"""
