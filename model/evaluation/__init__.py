"""Offline evaluation of sampled CA backbones: per-length metrics, targets, comparison, report, CLI.

Modules (import the one you need; nothing heavy is imported here):
    metrics        CA-CA, clashes, radius of gyration, P-SEA secondary structure, samples-vs-real table
    targets        the quality targets, checked per length with signed margins
    tmscore        TM-score (tmtools), pairwise matrix, clusters, novelty; TMRunner (worker processes)
    real_chains    held-out real chains from a training-set index, matched by length
    sampling       samples of every length (batched, bf16 on CUDA, seeds, the sampler seam)
    suite          one model's (or two models') per-length results
    compare        model A against model B, metric by metric and length by length
    steps_curve    quality against sampling steps: which fewer-step sampler matches the full one
    mpnn_proxy     designability proxy: CA-only ProteinMPNN's NLL of its own designs (offline)
    designability  ProteinMPNN (CA-only) + ESMFold self-consistency: scRMSD / scTM / pLDDT
    plots, report, summary   PNG plots, HTML report, summary.md / metrics.json / comparison.md
    cli            ``mhcflash evaluate`` and ``mhcflash steps-curve``

Symbols: L residues, N chains. CA traces are ``[L, 3]`` Angstrom (numpy or torch).
"""
