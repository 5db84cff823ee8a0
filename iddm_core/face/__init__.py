"""Face stack: detection (5 landmarks), differentiable alignment, PyTorch recognisers, FaceEnsembleLoss."""
