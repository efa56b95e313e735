"""The run's tables and plots, computed only from the evaluation result files (and the
train.json beside each).  Every table and figure is wrapped in report(...) with a caption under
workflow/report/, so `snakemake --report <file>.html` (or --report-after-run) shows them all."""
from pathlib import Path

import yaml

#: Where this run's paper tables (papers/), claims table (claims.*) and plots (plots/) go:
#: config paper_tables_dir (relative to the working directory, like results_dir), else
#: <results_dir>/paper_tables, so runs that leave it unset (smoke, tests) write only there.
PAPER_TABLES = config.get("paper_tables_dir") or f"{RESULTS}/paper_tables"
PAPER_REGISTRY = "paper_tables/papers.yaml"
CLAIM_DEFINITIONS = "paper_tables/published/claims.yaml"
#: The registry's table keys when paper_tables/papers.yaml is absent (its `tables[].key`).
PAPER_TABLE_KEYS = ("bb", "selective", "iada", "batchout_notes", "baselines")
CAPTIONS = "../report"


def paper_table_keys():
    """The keys of paper_tables/papers.yaml (`tables: [{key: ...}, ...]`), read while the DAG
    is built, in file order; PAPER_TABLE_KEYS if the file is absent."""
    path = Path(PAPER_REGISTRY)
    if not path.exists():
        return list(PAPER_TABLE_KEYS)
    tables = (yaml.safe_load(path.read_text()) or {}).get("tables")
    if not isinstance(tables, list) or not all(isinstance(t, dict) and "key" in t for t in tables):
        raise ValueError(f"{PAPER_REGISTRY}: needs a list 'tables' of entries with a 'key'")
    return [str(t["key"]) for t in tables]


PAPER_KEYS = paper_table_keys()


def plot_names():
    """methods.plots.PLOTS: the fixed set of plots rule `plots` writes (imported here, no torch)."""
    from methods.plots import PLOTS

    return list(PLOTS)


def plot_file(name, suffix):
    return f"{PAPER_TABLES}/plots/{name}{suffix}"


def table_report(path, caption, category, subcategory):
    """A table or figure in the report, listed by its file name; `caption` is a file under
    workflow/report/ (Markdown tables are shown through their HTML pages: report.smk)."""
    return report(path, caption=f"{CAPTIONS}/{caption}", category=category,
                  subcategory=subcategory, labels={"file": Path(path).name})


rule aggregate:
    """The run's table (Markdown + CSV), computed only from the evaluation result files."""
    input:
        evals=all_evaluations(),
    output:
        markdown=f"{RESULTS}/tables/{{run}}.md",
        csv=table_report(f"{RESULTS}/tables/{{run}}.csv", "run_table.rst", "Tables", "Run table"),
    wildcard_constraints:
        run=r"[^/]+",
    params:
        published=config.get("published", []),
        annotations=lambda wildcards: annotations(),
    conda:
        "../../envs/tables.conda.yaml"
    log:
        f"{RESULTS}/logs/aggregate/{{run}}.log",
    shell:
        "{PY} -m methods aggregate --evals {input.evals:q} --markdown {output.markdown:q} "
        "--csv {output.csv:q} --published {params.published:q} "
        "--annotations {params.annotations:q} > {log} 2>&1"


rule masking_report:
    """The gradient-masking report per model (Markdown + CSV), from the evaluation files only
    (methods/masking_report.py: thresholds and verdicts)."""
    input:
        evals=all_evaluations(),
    output:
        markdown=f"{RESULTS}/tables/masking/{{run}}.md",
        csv=table_report(f"{RESULTS}/tables/masking/{{run}}.csv", "masking.rst", "Masking",
                         "Masking report"),
    wildcard_constraints:
        run=r"[^/]+",
    conda:
        "../../envs/tables.conda.yaml"
    log:
        f"{RESULTS}/logs/masking_report/{{run}}.log",
    shell:
        "{PY} -m methods masking-report --evals {input.evals:q} --markdown {output.markdown:q} "
        "--csv {output.csv:q} > {log} 2>&1"


rule eps_curves:
    """Accuracy over eps (FGSM/PGD sweeps; eps 0 = clean) with 95% bands, one panel per
    dataset x attack family, PNG + PDF + the plotted points as CSV, from the evaluation files."""
    input:
        evals=all_evaluations(),
    output:
        png=table_report(f"{RESULTS}/plots/eps_curves/{{run}}.png", "eps_curves.rst", "Plots",
                         "eps_curves"),
        pdf=f"{RESULTS}/plots/eps_curves/{{run}}.pdf",
        csv=table_report(f"{RESULTS}/plots/eps_curves/{{run}}.csv", "eps_curves.rst", "Plots",
                         "eps_curves"),
    wildcard_constraints:
        run=r"[^/]+",
    conda:
        "../../envs/tables.conda.yaml"
    log:
        f"{RESULTS}/logs/eps_curves/{{run}}.log",
    shell:
        "{PY} -m methods eps-curves --evals {input.evals:q} --png {output.png:q} "
        "--pdf {output.pdf:q} --csv {output.csv:q} > {log} 2>&1"


rule paper_tables:
    """One regenerated table per seed paper of paper_tables/papers.yaml (Markdown, LaTeX, CSV)
    and index.md: published numbers beside this run's (methods/paper_tables.py)."""
    input:
        evals=all_evaluations(),
        papers=PAPER_REGISTRY,
        published=config.get("published", []),
    output:
        markdown=[f"{PAPER_TABLES}/papers/{key}.md" for key in PAPER_KEYS],
        tex=[f"{PAPER_TABLES}/papers/{key}.tex" for key in PAPER_KEYS],
        csv=[table_report(f"{PAPER_TABLES}/papers/{key}.csv", "paper_tables.rst", "Paper tables",
                          key)
             for key in PAPER_KEYS],
        index=f"{PAPER_TABLES}/papers/index.md",
    params:
        out_dir=f"{PAPER_TABLES}/papers",
        annotations=lambda wildcards: annotations(),
    conda:
        "../../envs/tables.conda.yaml"
    log:
        f"{RESULTS}/logs/paper_tables/{config['run_name']}.log",
    shell:
        "{PY} -m methods paper-tables --evals {input.evals:q} --papers {input.papers:q} "
        "--published {input.published:q} --annotations {params.annotations:q} "
        "--out-dir {params.out_dir:q} > {log} 2>&1"


rule claims:
    """The seed papers' headline claims as paired comparisons over seeds (Markdown, CSV, LaTeX),
    from the evaluation files and paper_tables/published/claims.yaml (methods/claims.py)."""
    input:
        evals=all_evaluations(),
        definitions=CLAIM_DEFINITIONS,
    output:
        markdown=f"{PAPER_TABLES}/claims.md",
        csv=table_report(f"{PAPER_TABLES}/claims.csv", "claims.rst", "Claims", "Claims table"),
        tex=f"{PAPER_TABLES}/claims.tex",
    conda:
        "../../envs/tables.conda.yaml"
    log:
        f"{RESULTS}/logs/claims/{config['run_name']}.log",
    shell:
        "{PY} -m methods claims --evals {input.evals:q} --definitions {input.definitions:q} "
        "--markdown {output.markdown:q} --csv {output.csv:q} --tex {output.tex:q} > {log} 2>&1"


rule plots:
    """The ablation and diagnostic plots of methods.plots.PLOTS (PNG, PDF and the plotted points
    as CSV each), from the evaluation files and the claims CSV (methods/plots.py)."""
    input:
        evals=all_evaluations(),
        claims_csv=rules.claims.output.csv,
    output:
        png=[table_report(plot_file(name, ".png"), f"plots/{name}.rst", "Plots", name)
             for name in plot_names()],
        pdf=[plot_file(name, ".pdf") for name in plot_names()],
        csv=[table_report(plot_file(name, ".csv"), f"plots/{name}.rst", "Plots", name)
             for name in plot_names()],
    params:
        out_dir=f"{PAPER_TABLES}/plots",
    conda:
        "../../envs/tables.conda.yaml"
    log:
        f"{RESULTS}/logs/plots/{config['run_name']}.log",
    shell:
        "{PY} -m methods plots --evals {input.evals:q} --claims-csv {input.claims_csv:q} "
        "--out-dir {params.out_dir:q} > {log} 2>&1"


localrules: masking_report, eps_curves, paper_tables, claims, plots
