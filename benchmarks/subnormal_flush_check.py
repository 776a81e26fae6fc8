"""python benchmarks/subnormal_flush_check.py [DATA_ROOT]  (PYTHONPATH=.)

Server-like: torch already used by the main thread; two new threads segment one LGE volume in float32,
one after flush_subnormals() (as a page run does), one without."""
import sys
import threading
import time

import torch

from core import io as mio
from core.atrium import segment_atrium
from core.config import data_root
from core.inference import load_model
from core.precision import flush_subnormals

torch.ones(64, 64) @ torch.ones(64, 64)  # the main thread's own pool starts unflushed
lm = load_model("atrium", precision="float32")
case = [c for c in mio.find_atrium_cases(data_root(sys.argv[1] if len(sys.argv) > 1 else None)) if c.dataset == "LA2018"][0]
vol = mio.load_nifti_path(case.image_path)


def run(flush, out):
    if flush:
        flush_subnormals()
    segment_atrium(lm, vol)  # first call: shapes
    t = time.perf_counter()
    r = segment_atrium(lm, vol)
    out[flush] = (time.perf_counter() - t, int(r.mask.sum()))


out = {}
for f in (True, False):
    th = threading.Thread(target=run, args=(f, out)); th.start(); th.join()
print(case.case_id, vol.data.shape, {("flushed" if k else "not flushed"): (round(v[0], 2), v[1]) for k, v in out.items()})
