"""SlimCLR example: slimmable contrastive pretraining and a switchable linear probe."""
