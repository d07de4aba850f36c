"""Small block-sparse attention cases, forward and backward, for compute-sanitizer (test_bsa_gpu runs this file
under it): a ragged grid with a cond split at head dim 128 (TMA loads of 64-token blocks) and 32-token blocks
two to a loop step (plain loads, a half-empty last step)."""

import torch

from longcat_dist.kernels import block_sparse_attention

CASES = [
    (2, 2, 128, (5, 6, 7), dict(num_cond_latents=1, sparsity=0.5)),
    (1, 2, 64, (7, 5, 6), dict(num_cond_latents=2, sparsity=0.8, chunk_shape=(2, 4, 4))),
]

if __name__ == "__main__":
    for batch, heads, head_dim, latent_shape, kwargs in CASES:
        n = latent_shape[0] * latent_shape[1] * latent_shape[2]
        q, k, v = (
            torch.randn(batch, heads, n, head_dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
            for _ in range(3)
        )
        out = block_sparse_attention(q, k, v, latent_shape=latent_shape, **kwargs)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert all(torch.isfinite(g).all() for g in (out, *grads))
    torch.cuda.synchronize()
    print("bsa sanitize cases ok")
