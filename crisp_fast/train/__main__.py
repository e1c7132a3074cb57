"""`python -m crisp_fast.train ...` / `torchrun --nproc-per-node N -m crisp_fast.train ...`"""
import sys

from crisp_fast.train.main import main

sys.exit(main())
