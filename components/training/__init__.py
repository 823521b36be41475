"""Training each case: frozen heads on cached features, careful fine-tuning (also across
processes with torchrun), the saved model format and held-out evaluation.
"""
