# Microbenchmarks of every registered method's training step (issue: measurement).
rule bench:
    output:
        directory(f"{RESULTS}/bench/{config['run_name']}"),
    params:
        config_file="workflow/config/bench.yaml",
    threads: config["threads"]
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/bench/{config['run_name']}.log",
    shell:
        "{PY} -m methods bench --config {params.config_file} --out-dir {output} > {log} 2>&1"
