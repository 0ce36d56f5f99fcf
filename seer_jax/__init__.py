"""seer-jax: SeerAttention (learned block-sparse attention, arXiv 2410.13276) in JAX and Flax NNX.

Axis alphabet, used in every einsum, shape annotation and shape comment of this project (models, kernels,
training code):

    B  batch                      T  query positions            S  key/value positions
    N  query heads                K  key/value heads            G  query heads per kv head (N // K)
    H  head dim                   D  model hidden size          F  MLP hidden size
    V  vocabulary                 I  query blocks               J  key/value blocks
    E  gate hidden size           L  layers

q/k/v are [B, T, N, H] / [B, S, K, H] at every module and op boundary; block tensors are [B, N, I, J].
"""
