"""The shared trainer: LR/momentum schedule, resume round trip, CO detection, result schema."""
import copy
import json

import pytest
import torch

from methods.results import read_result, validate
from methods.builders import build_schedule
from methods.training import is_catastrophic_overfitting

# tiny_cell, rehash and run live in helpers; other test modules import them from here too.
from tests.helpers import assert_same_training, kill_then_resume, rehash, run, tiny_cell


def schedule_values(spec, opt_name="sgd", steps_per_epoch=5, epochs=2, lr=0.2):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = (torch.optim.SGD([p], lr=lr, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam([p], lr=lr))
    sched = build_schedule(opt, spec, lr, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs + 1):
        g = opt.param_groups[0]
        out.append((g["lr"], g.get("momentum")))
        opt.step()
        sched.step()
    return out


def test_cyclic_lr_and_momentum_at_known_steps():
    v = schedule_values({"name": "cyclic", "peak_at": 0.5})  # 10 steps, peak at step 5
    assert v[0] == pytest.approx((0.0, 0.9))
    assert v[1] == pytest.approx((0.04, 0.88))       # lr rises 0.2/5 per step, momentum falls
    assert v[5] == pytest.approx((0.2, 0.8))         # peak LR, lowest momentum (spec 2.4)
    assert v[8] == pytest.approx((0.08, 0.86))
    assert v[10] == pytest.approx((0.0, 0.9))


def test_cyclic_peak_at_two_fifths_and_no_momentum_cycling_for_adam():
    v = schedule_values({"name": "cyclic", "peak_at": 0.4}, opt_name="adam")
    assert v[4][0] == pytest.approx(0.2) and v[0][0] == 0.0 and v[10][0] == pytest.approx(0.0)
    assert v[2][0] == pytest.approx(0.1) and v[7][0] == pytest.approx(0.1)


def test_multistep_milestones_are_in_epochs():
    v = schedule_values({"name": "multistep", "milestones": [1], "gamma": 0.1})
    assert v[4][0] == pytest.approx(0.2) and v[5][0] == pytest.approx(0.02)


def test_unknown_schedule_names_the_field():
    with pytest.raises(ValueError, match="train.schedule.name"):
        schedule_values({"name": "cosine-ish"})


def test_co_detection_compares_with_the_best_earlier_epoch():
    hist = [{"pgd_acc": 0.4}, {"pgd_acc": 0.45}]
    assert not is_catastrophic_overfitting(hist, {"pgd_acc": 0.3}, 0.2)
    assert is_catastrophic_overfitting(hist, {"pgd_acc": 0.2}, 0.2)
    assert not is_catastrophic_overfitting([], {"pgd_acc": 0.0}, 0.2)


def test_killed_run_resumes_to_the_same_weights(mnist5k_prepared, tmp_path):
    cell = tiny_cell("bb", {"m": 2, "selection": "gs"})
    straight = run(cell, mnist5k_prepared, tmp_path / "straight")
    # killed in the middle of epoch 2 (after its second step); the helper checks what the kill
    # left: state.pt of epoch 1 only, no train.json, last.pt, best.pt or temporary file
    resumed = kill_then_resume(cell, mnist5k_prepared, tmp_path / "killed", epoch=2, step=1)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    assert_same_training(tmp_path / "straight", tmp_path / "killed", straight, resumed)
    assert resumed["checkpoints"]["best"]["epoch"] == straight["checkpoints"]["best"]["epoch"]


def test_changed_config_does_not_resume_from_a_stale_state(mnist5k_prepared, tmp_path):
    cell = tiny_cell("standard", epochs=1)
    run(cell, mnist5k_prepared, tmp_path)
    other = copy.deepcopy(cell)
    other["train"]["optimizer"]["lr"] = 0.01
    rehash(other)
    record = run(other, mnist5k_prepared, tmp_path)
    assert record["resumed_from_epoch"] is None
    assert list((tmp_path / "checkpoints").glob("state.stale-*.pt"))


def test_train_result_is_schema_valid_and_records_passes_and_provenance(mnist5k_prepared, tmp_path):
    record = run(tiny_cell("pgd_at", {"steps": 4, "alpha": 0.1}, epochs=1), mnist5k_prepared, tmp_path)
    on_disk = read_result(tmp_path / "train.json", "train_result.schema.json")
    assert on_disk == record  # what the trainer returns is exactly what it wrote
    assert on_disk["passes"]["per_example"] == {"forward": 5.0, "backward": 5.0}
    assert on_disk["provenance"]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert on_disk["checkpoints"]["best"]["selected_by"].startswith("monitor pgd_acc")
    assert {r["path"] for r in on_disk["measurement"]["records"]} >= {"run", "run/train", "run/train/epoch_000"}
    broken = json.loads(json.dumps(on_disk))
    broken["history"][0]["pgd_acc"] = "0.5"
    with pytest.raises(ValueError, match="history/0/pgd_acc"):
        validate(broken, "train_result.schema.json")


def test_bf16_autocast_and_channels_last_train_on_cpu(mnist5k_prepared, tmp_path):
    cell = tiny_cell("nfgsm", epochs=1)
    cell["runtime"].update({"amp": "bf16", "channels_last": True})
    rehash(cell)
    record = run(cell, mnist5k_prepared, tmp_path)
    assert record["runtime"]["precision"] == "bf16" and record["runtime"]["channels_last"]
    assert all(h["train_loss"] is not None and h["train_loss"] == h["train_loss"] for h in record["history"])


@pytest.mark.slow
def test_torch_compile_path_trains(mnist5k_prepared, tmp_path):
    cell = tiny_cell("pgd_at", {"steps": 2, "alpha": 0.1}, epochs=1)
    cell["runtime"]["compile"] = True
    rehash(cell)
    record = run(cell, mnist5k_prepared, tmp_path)
    assert record["runtime"]["compile"] is True
    assert record["passes"]["per_example"] == {"forward": 3.0, "backward": 3.0}
