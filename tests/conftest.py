import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread everywhere, in this process and in every child a test starts (they inherit the
# environment): a CPU reduction's order, and so the last bits of a float result, depend on
# the thread count. Tests that compare a child's output with this process's bit for bit
# (kill and resume, torchrun) need the same count.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)
