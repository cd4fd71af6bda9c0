"""Run a study (a paper's comparison) on Ray and write its report; or rebuild a report from a study's results.

    python -m experiments.study --list
    python -m experiments.study digits_methods                         # train every cell, then write the report
    python -m experiments.study digits_methods trainer.max_epochs=2 study.num_cpus=4
    python -m experiments.study digits_methods resume=true             # continue: finished cells are kept
    python -m experiments.study --report runs/studies/digits_methods   # the report again, without training

Studies are YAML files in experiments/studies/ (keys: mtl_lightning/search/study.py, StudyConfig); `study.*`
overrides change them, every other key=value configures the cells' training as in `experiments.run`. With
RAY_ADDRESS set the cells run on that cluster. Outputs: <out_dir>/studies/<name>/ (report.md, results.csv, PNGs).
`--check` composes and checks every cell, metric and reference, prints the plan's size and stops before Ray starts.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from mtl_lightning.errors import MTLError
from mtl_lightning.search.report import write_report
from mtl_lightning.search.study import list_studies, load_study, plan_study, run_study


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        if argv[0] == "--list":
            for name, desc in list_studies():
                print(f"{name:28s} {desc}")
            return 0
        if argv[0] == "--report":
            if len(argv) != 2 or not (Path(argv[1]) / "meta.json").exists():
                raise MTLError(
                    "--report takes one study folder, the one holding meta.json and cells/ (a study's out_dir, or a "
                    "folder of reproduction/)."
                )
            print(f"report: {write_report(Path(argv[1]))}")
            return 0
        unknown = [a for a in argv[1:] if a.startswith("--") and a != "--check"]
        if unknown:
            raise MTLError(f"unknown option {unknown[0]}. Options: --list, --report FOLDER, --check, --help.")
        if "--check" in argv:
            argv = [a for a in argv if a != "--check"]
            if not argv:
                raise MTLError("--check checks a study: give its name (python -m experiments.study --list lists them).")
            cfg, overrides = load_study(argv[0], argv[1:])
            plan = plan_study(cfg, overrides)
            print(f"check passed: study {cfg.name}, {len(plan.cells)} cells; nothing started")
            return 0
        cfg, overrides = load_study(argv[0], argv[1:])
        # the report's command reproduces the study: every override, less the resume flag (it changes no result)
        kept = [a for a in argv if a.split("=", 1)[0] not in ("resume", "study.resume")]
        out = run_study(cfg, overrides, command="python -m experiments.study " + shlex.join(kept))
    except MTLError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    print(f"\nstudy {cfg.name}: report in {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
