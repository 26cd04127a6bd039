"""cmath-bench: the PyTorch model, torch.compile and the onnxruntime runtime side by side on one checkpoint."""
