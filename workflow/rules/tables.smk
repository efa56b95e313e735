rule aggregate:
    """The run's table (Markdown + CSV), computed only from the evaluation result files."""
    input:
        evals=all_evaluations(),
    output:
        markdown=f"{RESULTS}/tables/{{run}}.md",
        csv=f"{RESULTS}/tables/{{run}}.csv",
    params:
        published=config.get("published", []),
        annotations=annotations(),
    log:
        f"{RESULTS}/logs/aggregate/{{run}}.log",
    shell:
        "{PY} -m methods aggregate --evals {input.evals:q} --markdown {output.markdown:q} "
        "--csv {output.csv:q} --published {params.published:q} "
        "--annotations {params.annotations:q} > {log} 2>&1"
