"""The DP benchmark's printed report: throughput ratios, the accuracy table over seeds, each goal with its verdict."""

from __future__ import annotations

from typing import Any


def print_result(result: dict[str, Any]) -> None:
    """Print the figures of one bench_dp result (SYNTHETIC data)."""
    t = result.get("throughput")
    if t:
        print(f"\nthroughput (whole model at {t['image-size']} px, batch {t['batch']}; {t['threads']} threads; img/s): "
              + ", ".join(f"{k} {v}" for k, v in t["img-s"].items()))
        print(f"DP-SGD/normal img/s, fast grouped-conv sampler: {t['dp-fast/normal']} (whole model)")
        print(f"DP-SGD/normal img/s, Opacus's stock sampler:    {t['dp-stock/normal']}")
        print(f"DP-compatible model without DP/normal:         {t['gn-no-dp/normal']}")
        print(f"fast/stock sampler speed-up:                   {t['dp-fast/dp-stock']}x")
        print(f"recipe ({t['recipe']}, K = {t['multiplicity']}, {t['recipe-image-size']} px, batch {t['recipe-batch']}) "
              f"DP/no-DP img/s, from images: {t['recipe-dp/recipe']}; from the feature cache: "
              f"{t['recipe-cached-dp/recipe-cached']}")
    rows = result.get("accuracy", {})
    if rows:
        print("\nfinal global accuracy (mean ± sd over seeds), largest per-site ε at δ, σ, training img/s per site:")
        for name, row in rows.items():
            eps = f"ε {row['epsilon']:.3f} at δ {row['delta']:g}, σ {row['noise-multiplier']}" if row["epsilon"] else "no DP"
            print(f"  {name:<24} {row['mean']:.4f} ± {row['sd']:.4f} (n = {row['seeds']}); {eps}; {row['img-s']} img/s")
        print("\n| recipe | no DP | local ε = 8 | local ε = 3 | local ε = 1 |\n| --- | --- | --- | --- | --- |")
        for group in ("scratch", "pretrained"):
            cells = [rows.get(f"{group} {v}") for v in ("non-DP", "ε=8", "ε=3", "ε=1")]
            print(f"| {group} | " + " | ".join(f"{c['mean']:.3f} ± {c['sd']:.3f} (n={c['seeds']})" if c else "—"
                                              for c in cells) + " |")
        for name, row in rows.items():
            if row["group"].startswith("central"):
                print(f"| {row['group']} ({row['variant']}) | {row['mean']:.3f} ± {row['sd']:.3f} (n={row['seeds']}) |")
    for name, g in result.get("goals", {}).items():
        state = "not measured" if g["met"] is None else ("met" if g["met"] else "MISSED")
        value = "—" if g["value"] is None else g["value"]
        print(f"goal {name}: {value} (target ≥ {g['target']}) {state}")
