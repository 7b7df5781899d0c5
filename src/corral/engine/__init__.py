"""What runs next to MLX and knows nothing of actors: the prefix cache and its disk tier.

Every function here is called from one model's engine thread (the writer thread of the
disk tier excepted, which touches files only).
"""
