"""The per-rule conda environments (`--sdm conda`): in step with the pip lock file, one for every
rule that runs a job, and the table / plot rules' environment without torch."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "workflow" / "rules"


def rule_blocks():
    """``{rule name: (its .smk file, its text)}`` for every rule in workflow/rules/."""
    blocks = {}
    for smk in sorted(RULES.glob("*.smk")):
        parts = re.split(r"^rule (\w+):\n", smk.read_text(), flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2]):
            blocks[name] = (smk, body)
    return blocks


def test_envs_are_written_from_the_lock_file():
    run = subprocess.run([sys.executable, str(REPO / "envs" / "make_conda_envs.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_the_full_env_pins_exactly_the_lock_file():
    lock = [l for l in (REPO / "envs" / "requirements.txt").read_text().splitlines()
            if l and not l.startswith("#")]
    env = re.findall(r"^      - (\S+)$", (REPO / "envs" / "advrepro.conda.yaml").read_text(), re.M)
    assert env == lock


#: Rules that read only result files: the torch-free environment.
TABLE_RULES = ("aggregate", "masking_report", "eps_curves", "paper_tables", "claims", "plots",
               "report_tables_html")


def test_every_rule_with_a_job_names_an_existing_env_and_tables_need_no_torch():
    blocks = rule_blocks()
    assert {"prepare_data", "train", "evaluate", "bench"} | set(TABLE_RULES) <= set(blocks)
    for name, (smk, body) in blocks.items():
        match = re.search(r'^    conda:\n        "([^"]+)"', body, re.M)
        assert match, f"rule {name} ({smk.name}) has no conda env"
        env = (smk.parent / match.group(1)).resolve()
        assert env.is_file(), f"rule {name}: {env} missing"
        pins = re.findall(r"^      - ([^=\s]+)==", env.read_text(), re.M)
        if name in TABLE_RULES:
            assert env.name == "tables.conda.yaml"
            assert not {"torch", "torchvision", "pyautoattack"} & set(pins), name
            assert {"pandas", "seaborn", "matplotlib", "jsonschema", "PyYAML", "scipy",
                    "Markdown"} <= set(pins)
        else:
            assert env.name == "advrepro.conda.yaml" and "torch" in pins, name
