import os
import sys

import torch

# Tiny models on a 2-core machine: one intra-op thread avoids OpenMP spin-wait stalls (8 ms per small matmul).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
