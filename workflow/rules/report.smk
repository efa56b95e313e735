"""The report's views of the Markdown tables.  Snakemake's report shows HTML inline but CSV and
Markdown only as downloads, so every Markdown table of the run is also rendered as an HTML page
(workflow/report/markdown_html.py) under <results_dir>/report/<run_name>/ and wrapped in
report(...); the CSVs (numbers as numbers) are reported beside them by the table rules."""

#: (Markdown table, its HTML page, caption, category, subcategory) for every table of the run.
REPORT_HTML = f"{RESULTS}/report/{config['run_name']}"
REPORT_TABLES = [
    (rules.aggregate.output.markdown, f"{REPORT_HTML}/run_table.html", "run_table.rst", "Tables",
     "Run table"),
    (rules.masking_report.output.markdown, f"{REPORT_HTML}/masking.html", "masking.rst",
     "Masking", "Masking report"),
    (rules.claims.output.markdown, f"{REPORT_HTML}/claims.html", "claims.rst", "Claims",
     "Claims table"),
] + [
    (markdown, f"{REPORT_HTML}/papers/{Path(markdown).stem}.html", "paper_tables.rst",
     "Paper tables", Path(markdown).stem)
    for markdown in [*rules.paper_tables.output.markdown, rules.paper_tables.output.index]
]


def report_markdown_inputs():
    """The Markdown tables with the run's name in place of aggregate's / masking_report's
    {run} wildcard."""
    return [str(markdown).replace("{run}", config["run_name"]) for markdown, *_ in REPORT_TABLES]


rule report_tables_html:
    """Every Markdown table of the run as an HTML page the report displays (same text)."""
    input:
        markdown=report_markdown_inputs(),
        # Not read: the captions count them (snakemake.input.evals), as for the table rules.
        evals=all_evaluations(),
        # Run as a module (it imports methods.results); listed so that an edit reruns it.
        script="workflow/report/markdown_html.py",
    output:
        html=[table_report(page, caption, category, subcategory)
              for _, page, caption, category, subcategory in REPORT_TABLES],
    params:
        pairs=lambda wildcards, input, output: [path for pair in zip(input.markdown, output.html)
                                                for path in pair],
    conda:
        "../../envs/tables.conda.yaml"
    log:
        f"{RESULTS}/logs/report_tables_html/{config['run_name']}.log",
    shell:
        "{PY} -m workflow.report.markdown_html {params.pairs:q} > {log} 2>&1"


localrules: report_tables_html
