"""Differential privacy for histofed: local DP-SGD per site (Opacus) with a persistent ledger, central DP, the report.

Modules (this package init imports nothing, so `common.config` can read the mode table alone):
- `modes`: the privacy-mode table (the only place that compares `privacy.mode` strings);
- `accounting`: δ, σ calibration, ε of an accountant history, local and central plans;
- `preflight`: every check possible before training;
- `trainer`: one site's DP-SGD round with its budget check and ledger update (imports Opacus);
- `ledger`: a site's accountant history on disk; `monitor`: the server's per-site ε, budget policy, the privacy report;
- `dp_model`, `grad_sampler`: the DP-compatible model and the fast grouped-conv per-sample gradients.
"""
