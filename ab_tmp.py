import json, os, sys
from bench import attention as A
from longcat_dist.kernels import bsa_triton
keys = ('select_ms', 'fwd_kernel_ms', 'dq_kernel_ms', 'dkdv_kernel_ms', 'bsa_fwd_ms', 'bsa_fwdbwd_ms')
short = bsa_triton.short_cond_rows
rows = []
for data in ('random', 'smooth'):
    for name, split, warps in (('split w4', True, None), ('split w2', True, 2), ('split w1', True, 1), ('no split', False, None)):
        if data == 'smooth' and warps in (1, 2):
            continue
        bsa_triton.short_cond_rows = short if split else (lambda grid: None)
        bsa_triton.DKDV_SHORT_WARPS = warps
        for shape in ('train', '704x24'):
            row = A.bench_shape(shape, False, False, data)
            row['variant'] = name
            rows.append(row)
            print(data, name, shape, {k: round(row[k], 2) for k in keys}, flush=True)
json.dump(rows, open(os.path.join(sys.argv[1], 'ab.json'), 'w'), indent=1)
