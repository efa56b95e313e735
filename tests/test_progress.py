"""The progress lines long jobs log: elapsed time, share done and the estimate of what remains."""
import io

from methods.progress import Progress, format_seconds


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 5.4, 59.6, 125, 3599, 3720)] == \
        ["0s", "5s", "1m00s", "2m05s", "59m59s", "1h02m"]


def test_estimate_is_elapsed_per_weight_times_weight_left():
    clock, out = FakeClock(), io.StringIO()
    p = Progress("train x", 10, stream=out, clock=clock)
    assert p.remaining_seconds() is None
    clock.now += 20
    line = p.unit_done("epoch 1/10", 2, "loss=0.5")
    assert p.remaining_seconds() == 80.0          # 20 s for weight 2, 8 left
    assert line == "[train x] epoch 1/10 done (2/10)  elapsed 20s  remaining ~1m20s  loss=0.5"
    assert out.getvalue() == line + "\n"


def test_a_resumed_job_counts_earlier_units_but_not_in_the_rate():
    clock, out = FakeClock(), io.StringIO()
    p = Progress("train x", 10, done_before=6, stream=out, clock=clock)
    clock.now += 30
    line = p.unit_done("epoch 7/10")
    assert "(7/10)" in line and p.remaining_seconds() == 90.0   # 30 s per epoch, 3 left


def test_bar_only_in_a_terminal_and_items_pass_through():
    out = io.StringIO()
    quiet = Progress("eval", 1, stream=out)          # a StringIO is not a terminal
    assert list(quiet.bar(range(5), total=5, desc="PGD")) == [0, 1, 2, 3, 4]
    assert out.getvalue() == ""
    shown = Progress("eval", 1, stream=out, interactive=True)
    assert list(shown.bar(range(5), total=5, desc="PGD")) == [0, 1, 2, 3, 4]
    assert "PGD" in out.getvalue() and "/5 [" in out.getvalue()   # tqdm drew (rate-limited)
