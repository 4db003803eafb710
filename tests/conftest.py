"""Test-session settings."""

import os
import sys

import torch

# Tiny models gain nothing from intra-op threads, and on a machine busy with other work two spinning
# threads can make each op wait for a descheduled peer (seen here: 30x slower). One thread keeps the
# suite's time predictable.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers as plain modules
