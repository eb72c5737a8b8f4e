"""One module per job's driver: prepare, pretrain, finetune, evaluate (with scoring, its Ray Data
actors). `jobs/*.py` parse a config and call these; they never parse argv or start Ray themselves
before their input checks pass.
"""
