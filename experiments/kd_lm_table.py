"""The README's language-model distillation table: token-level KD on python_docs, 3 seeds each.

A 4-block, 128-wide GPT teacher (trained first by `modrun distill`, then reused for every method of that
seed) teaches a 2-block, 64-wide student (`experiment=kd_lm_python_docs`). Every number comes from a real
`modrun` run (subprocesses of the CLI) and its summary.json:

    python experiments/kd_lm_table.py [--seeds 0 1 2] [--runs-dir experiments/runs]

Prints a markdown table (val/test bits per byte, mean ± std over seeds; params, MACs and batch-1 latency of
the model) and writes it to RUNS_DIR/kd_lm.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from common import cell, modrun, read

STUDENT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64"]
METHODS = {
    "student with kd (T=1)": ["kd=kd"],
    "student with reverse_kl": ["kd=reverse_kl"],
    "student with jsd (beta 0.5)": ["kd=jsd"],
    "student with kd, top-32 teacher cache": ["kd=kd", "kd.cache_teacher=true", "kd.cache_topk=32"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", default="experiments/runs")
    args = parser.parse_args()
    runs: dict[str, list[Path]] = {}
    for seed in args.seeds:
        alone = ["train", "--runs-dir", args.runs_dir, "experiment=lm_python_docs", *STUDENT, f"seed={seed}"]
        runs.setdefault("student alone (2 x 64)", []).append(modrun(*alone))
        for name, extra in METHODS.items():
            run = modrun("distill", "--runs-dir", args.runs_dir, "experiment=kd_lm_python_docs", *extra, f"seed={seed}")
            runs.setdefault(name, []).append(run)
            bpb = read(run)["final"]["test/bpb"]
            print(f"seed {seed} {name}: test bpb {bpb:.4f}", file=sys.stderr, flush=True)
        teacher = Path(read(run)["teachers"][0]["run"])  # the same teacher for every method of this seed
        runs.setdefault("teacher (4 x 128)", []).append(teacher)
    lines = [
        "| model | val bpb | test bpb | params | MACs / window | latency (ms, batch 1) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ["teacher (4 x 128)", "student alone (2 x 64)", *METHODS]:
        summaries = [read(r) for r in runs[name]]
        val, test = ([s["final"][f"{k}/bpb"] for s in summaries] for k in ("val", "test"))
        latency = statistics.median(s["latency_ms_batch1"] for s in summaries)
        first = summaries[0]
        lines.append(
            f"| {name} | {cell(val, 3)} | {cell(test, 3)} | {first['params']:,} | {first['macs'] / 1e6:.1f} M "
            f"| {latency:.2f} | {len(summaries)} |"
        )
    table = "\n".join(lines)
    print(table)
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.runs_dir) / "kd_lm.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
