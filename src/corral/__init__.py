"""corral: a fault-tolerant runtime for serving language models with MLX, on trio actors."""
