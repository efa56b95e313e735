rule evaluate:
    """Clean accuracy, the configured attacks and AutoAttack (on a recorded stratified subset) for
    one checkpoint, under the evaluation identity taken from the workflow config."""
    input:
        train=f"{CELL}/train.json",
        weights=f"{CELL}/checkpoints/{{checkpoint}}.pt",
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
    output:
        f"{CELL}/eval_{{checkpoint}}.json",
    params:
        evaluation=evaluation_identity,
    threads: config["threads"]
    resources:
        gpu=1,
    log:
        f"{CELL}/logs/evaluate_{{checkpoint}}.log",
    shell:
        "{PY} -m methods evaluate --train-result {input.train:q} --checkpoint {wildcards.checkpoint} "
        "--evaluation {params.evaluation:q} "
        "--data-dir {DATA:q} --prepared-dir {RESULTS}/data/{wildcards.dataset} "
        "--result {output:q} " + WHERE + " > {log} 2>&1"
