"""Pipelines: plain functions that wire components together and call the loop, one per command."""

PIPELINES = {
    "train": "modrun.pipelines.train:train",
    "distill": "modrun.pipelines.distill:distill",
    "prune": "modrun.pipelines.prune:prune",
    "grow": "modrun.pipelines.grow:grow",
    "stitch": "modrun.pipelines.stitch:stitch",
}
