import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))

# Triton kernels run in its CPU interpreter when there is no GPU (read when kernels are defined)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
