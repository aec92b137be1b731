"""The README's "composing models" tables on digits: accuracy against cost, mean ± std over seeds.

Every number comes from real `modrun` runs (subprocesses of the CLI) and their run folders (summary.json,
nested.json, grow.json, config.yaml):

    python experiments/compose_digits_table.py [--seeds 0 1 2] [--runs-dir experiments/runs]
        [--parts sorted depth matryoshka grow stitch merge] [--quick]

- sorted: `experiment=nested_sorted_digits` (cnn_small w32, widths 0.25..1) vs each width trained alone, 15 epochs.
- depth: `experiment=nested_depth_digits` (resnet20 w0.5, 2 widths x 3 depths) vs each size alone (`model=resnet`).
- matryoshka: `experiment=nested_matryoshka_digits` (embedding prefixes 8/16/32/128) vs a plain cnn_small w32.
- grow: `grow_stack_digits` and `grow_net2wider_digits` (source trained with `source.seed=S`) vs the grown and the
  source architecture trained alone for the same total epochs (source.epochs + trainer.epochs of the recipe).
- stitch: anchors cnn_small w8 and w32 (5 epochs), then `experiment=stitch_digits`: both anchors and every point.
- merge: a base cnn_small w32 (5 epochs, seed S), three fine-tunes of it (`modrun prune prune.sparsity=0
  recover=finetune`, 3 epochs, seeds 3S, 3S+1, 3S+2), and their uniform, greedy and task-arithmetic soups.

Tables go to stdout and RUNS_DIR/compose_digits.md (rewritten after each part); one progress line per run to
stderr. `--quick` appends trainer.epochs=1 (and source.epochs=1 to grow) to every command: a smoke test only.
A command repeated within one invocation runs once: the plain cnn_small w32 of `sorted` is that of `matryoshka`,
the w32 anchor of `stitch` is the base of `merge` (same seed, same config).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import cell, modrun, read, top1
from omegaconf import OmegaConf

from modrun.methods.nested.base import keep, keep_blocks

RESNET20_BLOCKS = 3  # residual blocks per stage of resnet20: depth = 6 * blocks + 2
ALONE = ["trainer.epochs=15"]  # the length of the nested recipes, for the sizes trained alone


class Runner:
    """Runs `modrun COMMAND` into one runs folder (quick overrides added), with a progress line per run."""

    def __init__(self, runs_dir: str, quick: bool) -> None:
        self.runs_dir, self.quick, self.tag = runs_dir, quick, ""
        self.done: dict[tuple[str, ...], Path] = {}  # the same command twice (e.g. a shared baseline): run once

    def __call__(self, command: str, *overrides: str) -> Path:
        if self.quick and command != "soup":  # the quick overrides come last: the last value of a key wins
            overrides = (*overrides, "trainer.epochs=1", *(["source.epochs=1"] if command == "grow" else []))
        args = [command, "--runs-dir", self.runs_dir, *overrides]
        if tuple(args) not in self.done:
            start = time.time()
            self.done[tuple(args)] = run = modrun(*args)
            shown = " ".join(o if len(o) < 60 else o[:57] + "..." for o in overrides)
            print(
                f"[{self.tag}] {command} {shown}: test top-1 {top1(run):.2f} ({time.time() - start:.0f} s) {run}",
                file=sys.stderr,
                flush=True,
            )
        return self.done[tuple(args)]


class Table:
    """A markdown table whose cells gather one value per seed: floats show as mean ± std, integers and text as
    the value (or every seed's value, where they differ)."""

    def __init__(self, title: str, columns: dict[str, str]) -> None:
        self.title, self.columns = title, columns
        self.rows: dict[str, dict[str, list[Any]]] = {}
        self.notes: list[str] = []

    def add(self, label: str, **cells: Any) -> None:
        for key, value in cells.items():
            self.rows.setdefault(label, {}).setdefault(key, []).append(value)

    def same(self, what: str, a: int, b: int) -> None:
        """Warn (stderr and a note under the table) when two counts that should be equal are not."""
        if a != b and f"warning: {what}: {a:,} != {b:,}" not in self.notes:
            self.notes.append(f"warning: {what}: {a:,} != {b:,}")
            print(self.notes[-1], file=sys.stderr)

    def markdown(self) -> str:
        lines = [
            f"### {self.title}",
            "",
            f"| | {' | '.join(self.columns.values())} |",
            "|---" * (1 + len(self.columns)) + "|",
        ]
        for label, cells in self.rows.items():
            lines.append(f"| {label} | {' | '.join(_show(cells.get(key, [])) for key in self.columns)} |")
        return "\n".join(lines + [f"\n{note}" for note in self.notes])


def _show(values: list[Any]) -> str:
    if values and all(isinstance(v, float) for v in values):
        return cell(values)
    return " / ".join(dict.fromkeys(f"{v:,}" if isinstance(v, int) else str(v) for v in values))


def config(run: Path) -> Any:
    return OmegaConf.load(run / "config.yaml")


def model_args(node: Any) -> list[str]:
    """Overrides that build this model config with `modrun train`."""
    return [f"model={node['name']}", *(f"model.{k}={node[k]}" for k in ("depth", "width") if k in node)]


def part_sorted(run: Runner, seeds: list[int]) -> Table:
    """Every width of a SortedNet cnn_small against the same cnn_small trained alone."""
    cols = {"params": "params", "macs": "MACs", "nested": "nested test top-1", "alone": "alone test top-1"}
    t = Table("Nested widths: `experiment=nested_sorted_digits` vs each width trained alone (15 epochs)", cols)
    for seed in seeds:
        nested = run("train", "experiment=nested_sorted_digits", f"seed={seed}")
        full = int(config(nested).model.width)
        for r in read(nested, "nested.json"):
            channels = keep(full, r["width"])  # cnn_small's `width` is its first conv's channels
            alone = run("train", "model=cnn_small", f"model.width={channels}", *ALONE, f"seed={seed}")
            label = f"width {r['width']:g} (cnn_small w{channels})"
            t.add(label, params=r["params"], macs=r["macs"], nested=r["test/top1"], alone=top1(alone))
            t.same(f"{label} params, nested vs alone", r["params"], read(alone)["params"])
    return t


def part_depth(run: Runner, seeds: list[int]) -> Table:
    """Every width x depth of a nested resnet20 against the same resnet trained alone."""
    cols = {"params": "params", "macs": "MACs", "nested": "nested test top-1", "alone": "alone test top-1"}
    t = Table("Nested widths x depths: `experiment=nested_depth_digits` vs each size alone (15 epochs)", cols)
    for seed in seeds:
        nested = run("train", "experiment=nested_depth_digits", f"seed={seed}")
        cfg = config(nested)
        for r in read(nested, "nested.json"):
            blocks, width = keep_blocks(RESNET20_BLOCKS, r["depth"]), r["width"] * float(cfg.model.width)
            size = ["model=resnet", f"model.depth={6 * blocks + 2}", f"model.width={width:g}"]
            alone = run("train", *size, f"optim.lr={cfg.optim.lr}", *ALONE, f"seed={seed}")
            label = f"width {r['width']:g}, depth {r['depth']:g} (resnet{6 * blocks + 2} w{width:g})"
            t.add(label, params=r["params"], macs=r["macs"], nested=r["test/top1"], alone=top1(alone))
            t.same(f"{label} params, nested vs alone", r["params"], read(alone)["params"])
    return t


def part_matryoshka(run: Runner, seeds: list[int]) -> Table:
    """Every embedding prefix of a Matryoshka cnn_small, and a plain cnn_small."""
    t = Table(
        "Matryoshka: `experiment=nested_matryoshka_digits`, the classifier on the first d features",
        {"params": "params", "macs": "MACs", "test": "test top-1"},
    )
    for seed in seeds:
        nested = run("train", "experiment=nested_matryoshka_digits", f"seed={seed}")
        for r in read(nested, "nested.json"):
            t.add(f"first {r['dim']} features", params=r["params"], macs=r["macs"], test=r["test/top1"])
        plain = run("train", "model=cnn_small", "model.width=32", *ALONE, f"seed={seed}")
        s = read(plain)
        t.add("plain cnn_small w32 (15 epochs)", params=s["params"], macs=s["macs"], test=top1(plain))
    return t


def part_grow(run: Runner, seeds: list[int]) -> Table:
    """Both growth recipes (each seed its own source) against both architectures trained alone."""
    cols = {
        "source_params": "source params",
        "source": "source test",
        "before": "grown, before training",
        "params": "grown params",
        "macs": "grown MACs",
        "after": "grown, trained",
        "scratch": "grown arch. alone, same epochs",
        "small": "source arch. alone, same epochs",
    }
    t = Table("Growing: source trained, grown, trained again vs both architectures alone for the same epochs", cols)
    for method in ("stack", "net2wider"):
        sources = set()
        for seed in seeds:
            grown = run("grow", f"experiment=grow_{method}_digits", f"seed={seed}", f"source.seed={seed}")
            g, s, cfg = read(grown, "grow.json"), read(grown), config(grown)
            sources.add(g["source"].get("run"))
            epochs = int(cfg.source.epochs) + int(cfg.trainer.epochs)
            same = [f"optim.lr={cfg.optim.lr}", f"trainer.epochs={epochs}", f"seed={seed}"]
            scratch = run("train", *model_args(g["grown_model"]), *same)
            small = run("train", *model_args(g["source_model"]), *same)
            label = f"{method}: {_name(g['source_model'])} → {_name(g['grown_model'])}"
            label += f", {cfg.source.epochs}+{cfg.trainer.epochs} epochs"
            t.add(
                label,
                source_params=g["source_metrics"]["params"],
                source=g["source_metrics"]["test/top1"],
                before=g["grown_before_training"]["test/top1"],
                params=s["params"],
                macs=s["macs"],
                after=top1(grown),
                scratch=top1(scratch),
                small=top1(small),
            )
        if len(sources) != len(seeds):
            t.notes.append(f"warning: {method}: {len(sources)} distinct source runs for {len(seeds)} seeds")
            print(t.notes[-1], file=sys.stderr)
    return t


def _name(node: dict) -> str:
    depth = node.get("depth", "")
    return f"{node['name']}{depth} w{node['width']:g}"


def part_stitch(run: Runner, seeds: list[int]) -> Table:
    """Both anchors and every stitch point of a stitchable cnn_small (w8 front, w32 back)."""
    t = Table(
        "Stitching: anchors cnn_small w8 and w32 (5 epochs each), `experiment=stitch_digits`",
        {"params": "params", "macs": "MACs", "val": "val top-1", "test": "test top-1"},
    )
    for seed in seeds:
        small, large = (
            run("train", "model=cnn_small", f"model.width={w}", "trainer.epochs=5", f"seed={seed}") for w in (8, 32)
        )
        stitched = read(run("stitch", "experiment=stitch_digits", f"anchors=[{small},{large}]", f"seed={seed}"))
        for r in stitched["stitches"]:
            anchor = stitched["stitch"].get(r["model"])
            label = f"{r['model']} anchor ({_name(anchor['model'])})" if anchor else f"stitched at point {r['point']}"
            t.add(label, params=r["params"], macs=r["macs"], val=r["val/top1"], test=r["test/top1"])
    return t


def part_merge(run: Runner, seeds: list[int]) -> Table:
    """Three fine-tunes of one base and their uniform, greedy and task-arithmetic soups."""
    t = Table(
        "Merging: 3 fine-tunes (3 epochs) of one base cnn_small w32 (5 epochs), and their soups",
        {"val": "val top-1", "test": "test top-1", "note": "kept / scale"},
    )
    for seed in seeds:
        base = run("train", "model=cnn_small", "model.width=32", "trainer.epochs=5", f"seed={seed}")
        t.add("base (5 epochs)", val=read(base)["final"]["val/top1"], test=top1(base))
        tune = ["prune.sparsity=0", "recover=finetune", "trainer.epochs=3", f"source.run={base}"]
        tunes = [run("prune", *tune, f"seed={3 * seed + k}", f"name=finetune{k}") for k in range(3)]
        finals = [read(ft)["final"] for ft in tunes]
        for k, final in enumerate(finals):
            t.add(f"fine-tune {k + 1} (seed 3S+{k})", val=final["val/top1"], test=final["test/top1"])
        t.add(
            "fine-tunes, mean of 3",
            val=statistics.mean(f["val/top1"] for f in finals),
            test=statistics.mean(f["test/top1"] for f in finals),
        )
        for soup in ("uniform", "greedy", "task_arithmetic"):
            s = read(run("soup", *map(str, tunes), f"soup={soup}", f"seed={seed}", f"name={soup}"))
            note = f"scale {s['scale']:g}" if soup == "task_arithmetic" else f"kept {s['kept']} of {s['ingredients']}"
            t.add(f"{soup.replace('_', ' ')} soup", val=s["final"]["val/top1"], test=s["final"]["test/top1"], note=note)
    return t


PARTS: dict[str, Callable[[Runner, list[int]], Table]] = {
    "sorted": part_sorted,
    "depth": part_depth,
    "matryoshka": part_matryoshka,
    "grow": part_grow,
    "stitch": part_stitch,
    "merge": part_merge,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", default="experiments/runs")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--quick", action="store_true", help="1 epoch everywhere: checks the script, not the models")
    args = parser.parse_args()
    run, out = Runner(args.runs_dir, args.quick), Path(args.runs_dir) / "compose_digits.md"
    seeds = ", ".join(map(str, args.seeds))
    quick = " (--quick: 1 epoch)" if args.quick else ""
    done = [f"## Composing models on digits: mean ± std over seeds {seeds}{quick}"]
    print(done[0] + "\n", flush=True)
    for part in args.parts:
        run.tag = part
        text = PARTS[part](run, args.seeds).markdown()
        print(text + "\n", flush=True)
        done.append(text)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n\n".join(done) + "\n")  # after every part: a late failure keeps the earlier tables


if __name__ == "__main__":
    main()
