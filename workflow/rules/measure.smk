rule bench:
    """Microbenchmarks of every method's training step (workflow/config/bench.yaml), the cost
    table, and the robust-accuracy-vs-cost plot drawn from this run's evaluation files."""
    input:
        evals=all_evaluations(),
    output:
        directory(f"{RESULTS}/bench/{config['run_name']}"),
    params:
        config_file="workflow/config/bench.yaml",
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../../envs/advrepro.conda.yaml"
    log:
        f"{RESULTS}/logs/bench/{config['run_name']}.log",
    shell:
        "{PY} -m methods bench --config {params.config_file} --out-dir {output} "
        "--evals {input.evals:q} > {log} 2>&1"
