"""Invariant Point Attention: the dense reference, Flash-IPA, its pair factors and the attention kernels.

Sources: AlphaFold 2 supplement Algorithm 22 (IPA), as in OpenFold ``structure_module.py`` and Genie
``genie/model/structure_net.py``; Flash-IPA (Liu et al., arXiv 2505.11580): IPA over rank-r pair
factors as one bias-free softmax attention, so a fused attention kernel runs it in O(L) memory.

Symbols:
    B  batch             L  residues           H  heads              C  per-head channels
    P  query / key points per head             P_v  value points per head
    r  pair-factor rank (``zFactorRank``)      k  neighbours (``kNeighbors``)
    C_s single channels  C_p pair channels     C_f factor channels   C_pv pair-value channels (C_f // 4)
    D_qk, D_v  widths of the attention rows (q / k, v) after widening

Modules (each imports only those above it):
    backends.py     which attention kernel runs: discovery of FlashAttention 4 / 3 / 2, the SDPA kernels
                    and the math reference; ``resolve_backend`` chooses once per shape and dtype
    attention.py    running it: ``math_attention`` (the fp32 reference) beside the fused kernels;
                    ``pack_rows`` / ``packed_attention`` (widened rows, folded key mask, row anchor)
    dense.py        ``InvariantPointAttention``: IPA over a dense pair tensor z [B, L, L, C_p] (Genie)
    knn.py          chunked k nearest neighbours by CA distance, with a smooth cutoff (``soft_knn``)
    factorizer.py   ``PairFactors`` and the two factorizers: from the dense pair tensor, or pair-free
    flash.py        ``FlashIPA``: IPA over ``PairFactors`` through one attention call, with its dense
                    O(L^2) reference on the same parameters; the legacy-layout weight upgrade

Every fast path has its reference beside it (dense IPA, ``FlashIPA(..., reference=True)``,
``math_attention``) and a test comparing them. Optional accelerators (FlashAttention) are imported
lazily, so the package imports and runs on a CPU-only machine. The layers take plain keyword
arguments; ``model.network.builder`` maps a ``Config`` onto them.
"""
