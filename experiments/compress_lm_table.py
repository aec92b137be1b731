"""The README's table of compressing a small language model: pruning, sorted exits and G_stack on python_docs.

Per seed, a 4-block, 128-wide GPT is trained with `experiment=lm_python_docs` for 16 epochs of 800 windows (400
steps; the recipe's 4 leave it undertrained). Recovery and fine-tuning train 4 epochs more, so "fine-tunes (mean
of 3)" in the merging table is the dense model given the same extra training: the fair bar for the recovered rows.
Then, all through the real `modrun` CLI (subprocesses), read from the runs' summary.json, nested.json and
metrics.jsonl:

- `prune=channel` 50 % (heads and MLP neurons) and `prune=layers` 50 % (2 of 4 blocks, angular distance), each
  as pruned (`recover=none`) and after token-level KD recovery from the dense model (`recover=distill kd=kd`);
- `prune=magnitude` 50 % per layer, `prune=wanda` 50 % and Wanda 2:4, as pruned and after fine-tuning (masks held);
- `nested=exits` (every depth 1..4 in one run) beside GPTs of 1, 2 and 3 blocks trained alone the same way;
- G_stack: the 1-block GPT trained alone is stacked 4x (`grow=stack grow.factor=4`) and trained on as many
  tokens as the dense model saw from scratch; the tokens it needs to reach the scratch model's final val loss;
- merging: 3 fine-tunes of the dense model (as long as recovery, seeds 3S+k) merged by task arithmetic, TIES and
  DARE, each without and with LiNeS (alpha 0.3, beta 0.7); the scale chosen on val from the soup's grid.

    python experiments/compress_lm_table.py [--seeds 0 1 2] [--runs-dir DIR] [--epochs 16] [--recover-epochs 4]

Prints markdown tables (mean ± std over seeds) and writes them to RUNS_DIR/compress_lm.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import cell, modrun, read

LM = ["experiment=lm_python_docs"]
# the recipe's optimiser and schedule, spelled out for prune and grow (whose configs have their own defaults)
OPTIM = ["optim=adamw", "optim.lr=2e-3", "optim.weight_decay=0.1", "optim.betas=[0.9,0.95]"]
OPTIM += ["sched.warmup_epochs=0.25", "trainer.grad_clip=1.0"]
RECOVER_OPTIM = ["optim=adamw", "optim.lr=5e-4", "optim.weight_decay=0.1", "trainer.grad_clip=1.0"]
PRUNES = {
    "channel 50% (heads + MLP neurons)": (["prune=channel", "prune.ratio=0.5"], "distill"),
    "layers 50% (2 of 4 blocks, angular)": (["prune=layers", "prune.ratio=0.5"], "distill"),
    "magnitude 50% per layer": (["prune=magnitude", "prune.sparsity=0.5", "prune.scope=layer"], "finetune"),
    "wanda 50%": (["prune=wanda", "prune.sparsity=0.5"], "finetune"),
    "wanda 2:4": (["prune=wanda", "prune.n_m=[2,4]"], "finetune"),
}


def latency(summary: dict) -> float:
    return summary.get("latency_ms_batch1") or summary.get("latency_ms_cpu_b1") or float("nan")


def macs(summary: dict) -> str:
    """The MACs dense kernels run; for sparse weights also the Linear MACs left if zeros were skipped."""
    total = summary["macs"]
    if summary.get("nonzero_params", summary["params"]) == summary["params"]:
        return f"{total / 1e6:.1f} M"
    skipped = summary["dense"]["sparse_macs"] - summary["sparse_macs"]  # sparse_macs: Linear layers' non-zero MACs
    return f"{total / 1e6:.1f} M ({(total - skipped) / 1e6:.1f} M without the zeros)"


def row(name: str, summaries: list[dict], params: str = "params") -> str:
    val, test = ([s["final"][f"{k}/bpb"] for s in summaries] for k in ("val", "test"))
    first = summaries[0]
    nonzero = first.get("nonzero_params") or first.get(params)
    size = f"{first[params]:,}" + (f" ({nonzero:,} non-zero)" if nonzero != first[params] else "")
    return (
        f"| {name} | {cell(val, 3)} | {cell(test, 3)} | {size} | {macs(first)} "
        f"| {statistics.median(latency(s) for s in summaries):.2f} | {len(summaries)} |"
    )


def tokens_to_reach(run: Path, target: float, tokens_per_step: int) -> int | None:
    """Training tokens after which the run's val loss first was <= target (None: never)."""
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "val" and record["loss"] <= target:
            return record["step"] * tokens_per_step
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", default="experiments/runs")
    parser.add_argument("--epochs", type=int, default=16, help="of 800 windows (the recipe's: 4)")
    parser.add_argument("--recover-epochs", type=int, default=4)
    args = parser.parse_args()
    out = ["--runs-dir", args.runs_dir]
    rows: dict[str, list[dict]] = {}
    exits: dict[str, list[dict]] = {}
    stack: list[dict] = []
    merges: dict[str, list[dict]] = {}

    def note(name: str, summary: dict) -> None:
        rows.setdefault(name, []).append(summary)
        print(f"{name}: test bpb {summary['final']['test/bpb']:.4f}", file=sys.stderr, flush=True)

    for seed in args.seeds:
        s = [f"seed={seed}", f"trainer.epochs={args.epochs}"]
        dense = modrun("train", *out, *LM, *s)
        note("dense GPT 4 x 128", read(dense))
        merge(out, dense, seed, args.recover_epochs, merges)
        src = [f"source.run={dense}"]
        recover = ["kd=kd", "kd.temperature=1", *RECOVER_OPTIM, f"trainer.epochs={args.recover_epochs}"]
        seeded = [f"seed={seed}"]
        for name, (prune, how) in PRUNES.items():
            note(f"{name}, as pruned", read(modrun("prune", *out, *src, *prune, "recover=none", *seeded)))
            extra = recover if how == "distill" else [*RECOVER_OPTIM, f"trainer.epochs={args.recover_epochs}"]
            label = "KD-recovered" if how == "distill" else "fine-tuned"
            note(f"{name}, {label}", read(modrun("prune", *out, *src, *prune, f"recover={how}", *extra, *seeded)))
        alone = {n: modrun("train", *out, *LM, f"model.n_layer={n}", *s) for n in (1, 2, 3)}
        sorted_run = modrun("train", *out, *LM, "nested=exits", *s)
        for r in read(sorted_run, "nested.json"):
            exits.setdefault(f"exit {r['exit']}", []).append({"final": r, **r})
        for n, run in alone.items():
            exits.setdefault(f"{n} blocks alone", []).append(read(run))
        exits.setdefault("4 blocks alone (dense)", []).append(read(dense))
        # G_stack: as many tokens as the dense model's training, in shorter epochs (val loss measured 4x as often)
        grown = modrun(
            "grow", *out, f"source.run={alone[1]}", "grow=stack", "grow.factor=4", *OPTIM,
            "data.windows_per_epoch=200", f"seed={seed}", f"trainer.epochs={4 * args.epochs}",
        )  # fmt: skip
        tokens_per_step = 32 * 128  # data.batch_size x block_size of the recipe
        target = read(dense)["final"]["val/loss"]
        source_tokens = read(alone[1])["steps"] * tokens_per_step
        stack.append(
            {
                "target": target,
                "grown": read(grown)["final"]["val/loss"],
                "tokens": tokens_to_reach(grown, target, tokens_per_step),
                "scratch_tokens": read(dense)["steps"] * tokens_per_step,
                "source_tokens": source_tokens,
            }
        )
        print(f"seed {seed} G_stack: {stack[-1]}", file=sys.stderr, flush=True)
    table = markdown(rows, exits, stack) + "\n\n" + merge_table(merges)
    print(table)
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.runs_dir) / "compress_lm.md").write_text(table + "\n")


SOUPS = {
    "task arithmetic": ["soup=task_arithmetic"],
    "TIES (density 0.2)": ["soup=ties", "density=0.2"],
    "DARE (drop 0.9)": ["soup=dare", "drop_rate=0.9"],
}
LINES = ["lines.alpha=0.3", "lines.beta=0.7"]


def merge(out: list[str], dense: Path, seed: int, epochs: int, merges: dict[str, list[dict]]) -> None:
    """Three fine-tunes of the dense model and their merges, each without and with LiNeS."""
    tune = [f"source.run={dense}", "prune.sparsity=0", "recover=finetune", *RECOVER_OPTIM, f"trainer.epochs={epochs}"]
    tunes = [str(modrun("prune", *out, *tune, f"seed={3 * seed + k}", f"name=finetune{k}")) for k in range(3)]
    finals = [read(Path(t))["final"] for t in tunes]
    merges.setdefault("base (the dense model)", []).append(read(dense)["final"])
    mean = {k: statistics.mean(f[k] for f in finals) for k in ("val/bpb", "test/bpb")}
    merges.setdefault("fine-tunes (mean of 3)", []).append(mean)
    for name, soup in SOUPS.items():
        for label, extra in (("", []), (" + LiNeS", LINES)):
            s = read(modrun("soup", *out, *tunes, *soup, *extra, f"seed={seed}"))
            merges.setdefault(name + label, []).append({**s["final"], "scale": s.get("scale")})
    print(f"seed {seed} merging: { {k: v[-1]['test/bpb'] for k, v in merges.items()} }", file=sys.stderr, flush=True)


def merge_table(merges: dict[str, list[dict]]) -> str:
    lines = ["| merging (3 fine-tunes of the dense GPT) | val bpb | test bpb | scale (per seed) |", "|---|---|---|---|"]
    for name, finals in merges.items():
        scales = ", ".join(f"{f['scale']:g}" for f in finals if f.get("scale") is not None) or "-"
        val, test = ([f[f"{k}/bpb"] for f in finals] for k in ("val", "test"))
        lines.append(f"| {name} | {cell(val, 3)} | {cell(test, 3)} | {scales} |")
    return "\n".join(lines)


def markdown(rows: dict[str, list[dict]], exits: dict[str, list[dict]], stack: list[dict]) -> str:
    head = "| model | val bpb | test bpb | params | MACs / window | latency (ms, batch 1) | runs |\n" + "|---" * 7 + "|"
    lines = [head, *(row(name, summaries) for name, summaries in rows.items())]
    lines += ["", head, *(row(name, summaries) for name, summaries in sorted(exits.items()))]
    reached = [s["tokens"] for s in stack if s["tokens"] is not None]
    lines += [
        "",
        "| G_stack (1 block -> 4, trained on the scratch model's token budget) | value |",
        "|---|---|",
        f"| scratch 4-block final val loss (nats/token) | {cell([s['target'] for s in stack], 4)} |",
        f"| grown 4-block final val loss | {cell([s['grown'] for s in stack], 4)} |",
        f"| seeds where the grown model reached the scratch loss | {len(reached)} of {len(stack)} |",
        f"| tokens it needed (grown model only) | {', '.join(f'{t:,}' for t in reached) or '-'} |",
        f"| scratch tokens | {stack[0]['scratch_tokens']:,} |",
        f"| 1-block source tokens (spent before growth) | {stack[0]['source_tokens']:,} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
