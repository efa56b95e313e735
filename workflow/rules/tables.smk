rule aggregate:
    """The run's table (Markdown + CSV), computed only from the evaluation result files."""
    input:
        evals=all_evaluations(),
    output:
        markdown=f"{RESULTS}/tables/{{run}}.md",
        csv=f"{RESULTS}/tables/{{run}}.csv",
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
        csv=f"{RESULTS}/tables/masking/{{run}}.csv",
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
        png=f"{RESULTS}/plots/eps_curves/{{run}}.png",
        pdf=f"{RESULTS}/plots/eps_curves/{{run}}.pdf",
        csv=f"{RESULTS}/plots/eps_curves/{{run}}.csv",
    wildcard_constraints:
        run=r"[^/]+",
    conda:
        "../../envs/tables.conda.yaml"
    log:
        f"{RESULTS}/logs/eps_curves/{{run}}.log",
    shell:
        "{PY} -m methods eps-curves --evals {input.evals:q} --png {output.png:q} "
        "--pdf {output.pdf:q} --csv {output.csv:q} > {log} 2>&1"


localrules: masking_report, eps_curves
