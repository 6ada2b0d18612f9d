"""Speed and memory benchmarks, ours (MLX) vs diffusers (PyTorch); see benchmarks/README.md."""
