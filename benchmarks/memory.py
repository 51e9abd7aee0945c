"""Section 5, memory: each section's process peak, and each method's rise in resident memory while it ran."""

from __future__ import annotations

from harness import Row, ratio


def memory_rows(sections: dict[str, dict]) -> list[Row]:
    """Section 5: each section's process peak, and each method's rise in RSS while it ran."""
    rows = []
    pairs = {"generation": ("baseline", "srlm", "sequential generate vs Engine"),
             "sft": ("trl", "srlm", "TRL SFTTrainer vs SFTModule"),
             "dpo": ("trl_default", "srlm_precompute", "TRL DPO default vs srlm precompute")}
    for name, d in sections.items():
        if "process_peak_rss_mb" not in d:
            continue
        rows.append(Row("memory", f"peak RSS of the {name} process (MiB)", None, d["process_peak_rss_mb"],
                        note="whole section, model(s) included"))
        if name in pairs:
            b, s, label = pairs[name]
            mb = (d.get(b) or {}).get("memory", {}).get("delta_mb")
            ms = (d.get(s) or {}).get("memory", {}).get("delta_mb")
            rows.append(Row("memory", f"RSS rise while running (MiB): {label}", mb, ms, ratio(mb, ms),
                            note="ratio = baseline / srlm (> 1: srlm uses less)"))
    judging = sections.get("judging", {})
    if "generative_k3" in judging:
        rows.append(Row("memory", "RSS rise while running (MiB): judge generative k=3 vs logit",
                        judging["generative_k3"]["memory"]["delta_mb"], judging["logit"]["memory"]["delta_mb"],
                        ratio(judging["generative_k3"]["memory"]["delta_mb"], judging["logit"]["memory"]["delta_mb"]),
                        note="ratio = baseline / srlm (> 1: srlm uses less)"))
    return rows
