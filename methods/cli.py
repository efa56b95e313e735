"""Command line used by the Snakemake rules: ``python -m methods <command> ...``.

``train`` takes the training identity as JSON (``methods.config.resolve_cell``), ``evaluate``
the evaluation identity (``methods.config.resolve_evaluation``), ``evaluate-shard`` (one job of
a sharded AutoAttack run) its AutoAttack part, ``aggregate`` the recipes' annotations,
``masking-report`` and ``eps-curves`` only evaluation files, plus paths, so a rule's inputs,
outputs and parameters say everything the command computes from.  ``eps-grid`` prints attack
specs over an eps grid for a config's ``evaluation.attacks``.  ``--device``, ``--threads`` and
``--meter`` say only where it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional


def _cmd_prepare(args) -> None:
    from .data import prepare_dataset

    spec = json.loads(args.spec)
    manifest = prepare_dataset(args.dataset, spec, Path(args.data_dir), Path(args.out_dir),
                               download=args.download)
    sizes = {k: v.get('size') for k, v in manifest.get('splits', {}).items() if isinstance(v, dict)}
    print(f"prepared {args.dataset}: {sizes}")


def _cmd_train(args) -> None:
    from .training import TrainingDiverged, train_cell

    cell = json.loads(args.cell)
    try:
        record = train_cell(cell, Path(args.data_dir), Path(args.prepared_dir),
                            Path(args.out_dir), Path(args.result), device=args.device,
                            threads=args.threads, meter_backend=args.meter)
    except TrainingDiverged as e:   # before any epoch finished: nothing to record
        sys.exit(f"train {cell.get('recipe')} seed {cell.get('seed')}: {e}")
    last = record["history"][-1]
    print(f"trained {record['cell']['recipe']}: epochs={record['epochs_completed']} "
          f"val clean={last['clean_acc']:.3f} pgd={last['pgd_acc']:.3f}")
    if record.get("diverged"):   # recorded (exit 0, so the campaign goes on): say it loudly
        print(f"DIVERGED: {record['diverged']['message']}; the checkpoints hold epoch "
              f"{record['diverged']['kept_epoch'] + 1}, the last finished one", file=sys.stderr)


def _cmd_evaluate(args) -> None:
    from .evaluation import evaluate_cell

    record = evaluate_cell(Path(args.train_result), json.loads(args.evaluation), args.checkpoint,
                           Path(args.data_dir), Path(args.prepared_dir), Path(args.result),
                           device=args.device, threads=args.threads, meter_backend=args.meter,
                           autoattack_shards=[Path(p) for p in args.autoattack_shards or []])
    summary = {k: round(v["acc"], 4) for k, v in record["metrics"].items()}
    if record["autoattack"]:
        summary["AutoAttack"] = round(record["autoattack"]["acc"], 4)
    print(f"evaluated {record['cell']['recipe']} ({args.checkpoint}): {summary}")


def _cmd_evaluate_shard(args) -> None:
    from .eval_shards import run_shard

    record = run_shard(Path(args.train_result), json.loads(args.evaluation), args.checkpoint,
                       Path(args.data_dir), Path(args.prepared_dir), args.part, args.shard,
                       args.shards, [Path(p) for p in args.previous], Path(args.result),
                       device=args.device, threads=args.threads)
    what = (f"{len(record['broken'])} of {record['attacked']} broken by {record['attack']}"
            if "attack" in record else f"{sum(record['flags'])} of {len(record['flags'])} robust")
    print(f"AutoAttack {args.part} shard {args.shard + 1}/{args.shards}: {what}")


def _cmd_aggregate(args) -> None:
    from .tables import aggregate

    aggregate([Path(p) for p in args.evals], Path(args.markdown), Path(args.csv),
              published=[Path(p) for p in args.published],
              annotations=json.loads(args.annotations))


def _cmd_masking_report(args) -> None:
    from .masking_report import masking_report

    rows = masking_report([Path(p) for p in args.evals], Path(args.markdown), Path(args.csv))
    verdicts = [r["verdict"] for r in rows]
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    print(f"masking report: {len(rows)} rows {counts}")


def _cmd_eps_curves(args) -> None:
    from .eps_curves import plot_eps_curves

    shown = plot_eps_curves([Path(p) for p in args.evals], Path(args.png),
                            Path(args.pdf) if args.pdf else None,
                            Path(args.csv) if args.csv else None)
    print(f"eps curves: {shown['curves']} curves in {len(shown['panels'])} panels "
          f"({', '.join(shown['panels']) or 'no eps sweep'})")


def _cmd_paper_tables(args) -> None:
    from .paper_tables import write_paper_tables

    written = write_paper_tables([Path(p) for p in args.evals], Path(args.papers),
                                 [Path(p) for p in args.published],
                                 json.loads(args.annotations), Path(args.out_dir))
    print(f"paper tables: {len(written)} files in {args.out_dir}")


def _cmd_claims(args) -> None:
    from .claims import write_claims

    rows = write_claims([Path(p) for p in args.evals], Path(args.definitions),
                        Path(args.markdown), Path(args.csv), Path(args.tex))
    verdicts = [r["verdict"] for r in rows]
    print(f"claims: {len(rows)} tests " + str({v: verdicts.count(v) for v in dict.fromkeys(verdicts)}))


def _cmd_plots(args) -> None:
    from .plots import write_plots

    written = write_plots([Path(p) for p in args.evals], Path(args.claims_csv), Path(args.out_dir))
    print(f"plots: {len(written)} files in {args.out_dir}")


def _cmd_eps_grid(args) -> None:
    from .eps_curves import eps_grid, grid_yaml

    attack = json.loads(args.attack)
    print(grid_yaml(eps_grid(attack, args.eps_max, args.points, args.skip), args.indent), end="")


def _cmd_bench(args) -> None:
    from .bench import run_bench

    run_bench(Path(args.config), Path(args.out_dir),
              evals=[Path(p) for p in args.evals] if args.evals else None)


def _where(p) -> None:
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--meter", default=None, help="auto | nvml | null | fake | replay")
    p.add_argument("--device-slots", default=None,
                   help="directory of the per-device lock files (methods/device_slots.py), e.g. "
                        "<results>/.device_slots; default $ADVREPRO_DEVICE_SLOTS_DIR or a "
                        "per-machine temp dir")
    p.add_argument("--device-when-busy", choices=["wait", "cpu"], default=None,
                   help="when every GPU slot is taken: wait for one (default) or run on the CPU")


def _export_where(args) -> None:
    """Hand the slot settings to runtime.pick_device (called deep in the stages) via the env."""
    from .device_slots import SLOTS_DIR_ENV, WHEN_BUSY_ENV

    if getattr(args, "device_slots", None):
        os.environ[SLOTS_DIR_ENV] = str(Path(args.device_slots).resolve())
    if getattr(args, "device_when_busy", None):
        os.environ[WHEN_BUSY_ENV] = args.device_when_busy


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m methods", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="verify or fetch a dataset and write its manifest")
    p.add_argument("--dataset", required=True)
    p.add_argument("--spec", required=True, help="the dataset's config entry as JSON")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--download", action="store_true")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train one cell (resumes from its state checkpoint)")
    p.add_argument("--cell", required=True, help="resolved cell config as JSON")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--prepared-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--result", required=True)
    _where(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate one checkpoint of a trained cell")
    p.add_argument("--train-result", required=True)
    p.add_argument("--evaluation", required=True, help="resolved evaluation identity as JSON")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--prepared-dir", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--autoattack-shards", nargs="*", default=None,
                   help="shard files of a sharded AutoAttack run (evaluation.autoattack.shards), "
                        "merged instead of running AutoAttack")
    _where(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("evaluate-shard", help="one job of a sharded AutoAttack evaluation "
                                              "(methods/eval_shards.py; resumable)")
    p.add_argument("--train-result", required=True)
    p.add_argument("--evaluation", required=True,
                   help="the evaluation identity, or its AutoAttack part, as JSON")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--part", required=True, help="stage<N> (AutoAttack's N-th sub-attack) or pgd")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--previous", nargs="*", default=[], help="the previous stage's shard files")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--prepared-dir", required=True)
    p.add_argument("--result", required=True)
    _where(p)
    p.set_defaults(func=_cmd_evaluate_shard)

    p = sub.add_parser("aggregate", help="tables from evaluation result files")
    p.add_argument("--evals", nargs="+", required=True)
    p.add_argument("--markdown", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--published", nargs="*", default=[])
    p.add_argument("--annotations", default="{}",
                   help="JSON {recipe: {paper, notes, published}} (methods.config.recipe_annotations)")
    p.set_defaults(func=_cmd_aggregate)

    p = sub.add_parser("masking-report", help="gradient-masking report (Markdown + CSV) from "
                                              "evaluation result files")
    p.add_argument("--evals", nargs="*", default=[])
    p.add_argument("--markdown", required=True)
    p.add_argument("--csv", required=True)
    p.set_defaults(func=_cmd_masking_report)

    p = sub.add_parser("eps-curves", help="accuracy-over-eps curves (PNG, PDF, points CSV) "
                                          "from evaluation result files")
    p.add_argument("--evals", nargs="*", default=[])
    p.add_argument("--png", required=True)
    p.add_argument("--pdf", default=None)
    p.add_argument("--csv", default=None, help="the plotted points")
    p.set_defaults(func=_cmd_eps_curves)

    p = sub.add_parser("paper-tables", help="one regenerated table per seed paper (Markdown, "
                                            "LaTeX, CSV): published beside reproduced")
    p.add_argument("--evals", nargs="*", default=[])
    p.add_argument("--papers", required=True, help="the paper registry (paper_tables/papers.yaml)")
    p.add_argument("--published", nargs="*", default=[])
    p.add_argument("--annotations", default="{}",
                   help="JSON {recipe: {paper, notes, published}} (methods.config.recipe_annotations)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_cmd_paper_tables)

    p = sub.add_parser("claims", help="the headline claims tested as paired comparisons over seeds")
    p.add_argument("--evals", nargs="*", default=[])
    p.add_argument("--definitions", required=True,
                   help="the claims (paper_tables/published/claims.yaml)")
    p.add_argument("--markdown", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--tex", required=True)
    p.set_defaults(func=_cmd_claims)

    p = sub.add_parser("plots", help="ablation and diagnostic plots (PNG + PDF, seaborn)")
    p.add_argument("--evals", nargs="*", default=[])
    p.add_argument("--claims-csv", required=True, help="the claims table's CSV")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_cmd_plots)

    p = sub.add_parser("eps-grid", help="print an eps grid of attack specs as YAML list items "
                                        "for evaluation.attacks")
    p.add_argument("--eps-max", required=True, help="e.g. 8/255 or 0.3")
    p.add_argument("--points", type=int, default=9, help="grid points including eps 0 (clean)")
    p.add_argument("--attack", default='{"name": "fgsm"}', help="the spec without eps, as JSON")
    p.add_argument("--skip", nargs="*", default=[],
                   help="eps values to leave out (the evaluation's own eps)")
    p.add_argument("--indent", type=int, default=4)
    p.set_defaults(func=_cmd_eps_grid)

    p = sub.add_parser("bench", help="microbenchmark every registered method's training step")
    p.add_argument("--config", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--evals", nargs="*", default=None,
                   help="evaluation files for the cost plot (default: the config's glob)")
    p.set_defaults(func=_cmd_bench)

    args = parser.parse_args(argv)
    _export_where(args)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
