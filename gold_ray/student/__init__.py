"""The student side: the model, its training loop and losses, energy scores, influence, evaluation."""
