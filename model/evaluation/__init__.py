"""Offline evaluation of sampled CA backbones (issue 7): metrics, designability, report, CLI.

Modules (import the one you need; nothing heavy is imported here):
    metrics        CA-CA, clashes, radius of gyration, P-SEA secondary structure, samples-vs-real table
    tmscore        TM-score (tmtools), pairwise matrix, single-linkage clusters, novelty
    designability  ProteinMPNN (CA-only) + ESMFold self-consistency: scRMSD / scTM / pLDDT
    report         HTML report (matplotlib PNGs, vendored 3Dmol.js) and Markdown summary
    cli            ``mhcflash evaluate``

Symbols: L residues, N chains. CA traces are ``[L, 3]`` Angstrom (numpy or torch).
"""
