"""Evaluate a trained run or checkpoint, on its own val/test split or on another root or split.

    python -m experiments.evaluate runs/digits_mtl/20261202-120000              # its last.ckpt (the final model)
    python -m experiments.evaluate runs/digits_mtl/20261202-120000 ckpt=best split=test
    python -m experiments.evaluate path/to/file.ckpt data.root=/data/other      # key=value: config keys to change
    python -m experiments.evaluate runs/digits_mtl/POPULATION member=2          # one member of a population
    python -m experiments.evaluate RUN --predict preds.npz                       # each task's predictions (.npz, .csv)

Prints the same table as a training run and writes the metrics as JSON (`<run>/eval/<ckpt>-<splits>.json`, or
`--out FILE`). `split` is val, test or both (the default); `--predict` writes the predictions of `split` (test by
default). `--check` loads the checkpoint and builds what the evaluation would (its config with the changes, its data,
its model) and stops before evaluating or writing anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.run import print_table
from mtl_lightning.errors import MTLError
from mtl_lightning.evaluate import (
    default_output,
    find_checkpoint,
    load_for_evaluation,
    run_evaluation,
    save_metrics,
    write_predictions,
)

OWN = ("ckpt", "split", "member")  # the command's own keys; every other key=value changes the checkpoint's config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        check = "--check" in argv
        argv = [a for a in argv if a != "--check"]
        unknown = [a for a in argv if a.startswith("--") and a not in ("--predict", "--out")]
        if unknown:
            raise MTLError(
                f"unknown option {unknown[0]}. Options: --predict FILE (.npz or .csv), --out FILE (.json), --check."
            )
        if argv[-1] in ("--predict", "--out"):
            raise MTLError(f"{argv[-1]} needs a file name after it. See --help.")
        flags = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--predict", "--out")}
        rest = [a for i, a in enumerate(argv) if a not in flags and (i == 0 or argv[i - 1] not in flags)]
        path, args = rest[0], rest[1:]
        bad = [a for a in args if "=" not in a]
        if bad:
            raise MTLError(f"{bad[0]!r} is not key=value; the path comes first. See --help.")
        own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in OWN}
        overrides = [a for a in args if a.split("=", 1)[0] not in OWN]
        split = own.get("split", "both")
        stages = ("val", "test") if split == "both" else (split,)
        member = int(own["member"]) if "member" in own else None
        ckpt = find_checkpoint(path, own.get("ckpt", "last"))
        cfg, built, ckpt = load_for_evaluation(ckpt, overrides, member)
        if check:
            print(f"check passed: {ckpt} loads for evaluation on {split}; nothing evaluated or written")
            return 0
        metrics = run_evaluation(cfg, built, stages)
        print_table(metrics)
        out = save_metrics(metrics, Path(flags["--out"]) if "--out" in flags else default_output(ckpt, stages, member))
        print(f"metrics: {out}")
        if "--predict" in flags:
            stage = stages[-1]  # test, unless split=val
            print(f"predictions ({stage}): {write_predictions(built, stage, Path(flags['--predict']))}")
    except MTLError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
