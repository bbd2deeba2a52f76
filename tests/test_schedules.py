"""KL annealing, teacher forcing, learning rate: each against its formula."""
from types import SimpleNamespace

import pytest

from modules.engine import epoch_settings
from modules.schedules import (TeacherForcingCoins, kl_beta, kl_schedule_note, lr_factor,
                               teacher_forcing_ratio)


def test_cyclical_lab_defaults():
    # 70 epochs, 10 cycles, ratio 1: a 7-epoch period rising 0, 1/7, ..., 6/7, then restarting.
    for e in range(70):
        assert kl_beta(e, "Cyclical", 70, 10, 1.0) == pytest.approx((e % 7) / 7)


def test_cyclical_half_ratio_holds_at_one():
    for e in range(70):
        assert kl_beta(e, "Cyclical", 70, 10, 0.5) == pytest.approx(min(1.0, (e % 7) / 3.5))


def test_monotonic_and_constants():
    for e in range(20):
        assert kl_beta(e, "Monotonic", 20, 10, 0.5) == pytest.approx(min(1.0, e / 10))
        assert kl_beta(e, "Full_KL", 20) == 1.0
        assert kl_beta(e, "None", 20) == 0.0


@pytest.mark.parametrize("sde", [0, 1, 2, 10])
def test_teacher_forcing_decay(sde):
    # The lab: after finished epoch n (from 1) with n >= tfr_sde, tfr -= tfr_d_step, floored at 0.
    # So the first epoch always runs at tfr (tfr_sde 0 decayed before it), and 0 acts as 1.
    tfr, expected = 1.0, []
    for n in range(1, 30):
        expected.append(tfr)
        if n >= sde:
            tfr = max(tfr - 0.1, 0.0)
    got = [teacher_forcing_ratio(e, 1.0, sde, 0.1) for e in range(29)]
    assert got == pytest.approx(expected)
    assert got[0] == 1.0 and got[-1] == 0.0
    first_lower = max(sde, 1)  # 0-based index of the first epoch after the first decay
    assert got[first_lower - 1] == 1.0 and got[first_lower] == pytest.approx(0.9)


def test_coins_are_reproducible_and_follow_the_ratio():
    a = TeacherForcingCoins(3, 7, 0.5, "frame")
    b = TeacherForcingCoins(3, 7, 0.5, "frame")
    assert [a.draw(15) for _ in range(5)] == [b.draw(15) for _ in range(5)]
    assert all(TeacherForcingCoins(0, e, 1.0).draw(15) is True for e in range(20))
    assert all(TeacherForcingCoins(0, e, 0.0, "step").draw(15) is False for e in range(20))
    frames = TeacherForcingCoins(1, 2, 0.3, "frame")
    draws = [x for _ in range(200) for x in frames.draw(15)]
    assert len(draws) == 3000 and 0.27 < sum(draws) / 3000 < 0.33
    coins = TeacherForcingCoins(1, 2, 0.3, "step")
    share = sum(coins.draw(15) for _ in range(4000)) / 4000
    assert 0.27 < share < 0.33


def test_lr_schedules():
    a = SimpleNamespace(scheduler="multistep", milestones=[2, 5], gamma=0.1, step_size=10, warmup_epochs=0.0,
                        num_epoch=70, lr=1e-3, min_lr=0.0)
    assert [lr_factor(e, a) for e in range(7)] == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])
    a.scheduler, a.step_size, a.gamma = "step", 3, 0.5
    assert [lr_factor(e + 0.5, a) for e in range(7)] == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25])
    a.scheduler, a.warmup_epochs, a.num_epoch, a.min_lr = "cosine", 2.0, 12, 1e-5
    assert lr_factor(1.0, a) == pytest.approx(0.5, abs=1e-3)
    assert lr_factor(2.0, a) == pytest.approx(1.0)
    assert lr_factor(7.0, a) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(12.0, a) == pytest.approx(0.01)
    a.scheduler = "none"
    assert lr_factor(50.0, a) == 1.0


def test_fast_train_uses_fast_partial_instead_of_partial():
    """The lab's fast_train trains on fast_partial of the data; it was multiplied by --partial
    (0.5 and 0.4 gave 0.2)."""
    a = SimpleNamespace(kl_anneal_type="Full_KL", num_epoch=10, kl_anneal_cycle=10, kl_anneal_ratio=1.0, tfr=1.0,
                        tfr_sde=10, tfr_d_step=0.1, partial=0.5, fast_train=True, fast_partial=0.4,
                        fast_train_epoch=3)
    assert [epoch_settings(e, a)[2] for e in range(5)] == [0.4, 0.4, 0.4, 0.5, 0.5]
    a.fast_train = False
    assert epoch_settings(0, a)[2] == 0.5


def test_a_kl_schedule_that_never_turns_on_is_told():
    """10 cycles over 5 epochs: every cycle starts at 0 within an epoch, so beta is 0 throughout."""
    assert [kl_beta(e, "Cyclical", 5, 10, 1.0) for e in range(5)] == [0.0] * 5
    assert "beta 0 in every epoch" in kl_schedule_note("Cyclical", 5, 10, 1.0)
    assert "beta 0 in every epoch" in kl_schedule_note("Monotonic", 1, 1, 1.0)  # a 1-epoch run starts at 0
    for args in (("Cyclical", 70, 10, 1.0), ("Cyclical", 2, 1, 1.0), ("Monotonic", 5, 10, 1.0), ("Full_KL", 5),
                 ("None", 5), ("Cyclical", 70, 10, 0.5)):
        assert kl_schedule_note(*args) is None, args


def test_a_kl_ratio_over_one_is_told_how_high_beta_gets():
    """A ratio over 1 stretches the rise past the cycle's end: with 2, beta climbs by 1/14 per epoch
    over 7-epoch cycles and reaches 6/14 = 0.43 before each restart."""
    assert max(kl_beta(e, "Cyclical", 70, 10, 2.0) for e in range(70)) == pytest.approx(6 / 14)
    assert "beta reaches at most 0.43" in kl_schedule_note("Cyclical", 70, 10, 2.0)
    assert "beta reaches at most 0.45" in kl_schedule_note("Monotonic", 10, 1, 2.0)  # 9/20 in the last epoch


def test_each_epoch_flips_a_coin_of_its_own():
    """The lab flips one teacher-forcing coin per epoch: at ratio 0.5 about half of a run's epochs
    are teacher-forced. A stream seeded by the seed alone gave every epoch the same coin, so a run
    was teacher-forced throughout or never."""
    for seed in (0, 1, 7):
        coins = [TeacherForcingCoins(seed, e, 0.5).epoch_coin for e in range(400)]
        assert 0.4 < sum(coins) / 400 < 0.6, seed
        # per step too: the first step of each epoch draws from that epoch's stream
        firsts = [TeacherForcingCoins(seed, e, 0.5, "step").draw(15) for e in range(400)]
        assert 0.4 < sum(firsts) / 400 < 0.6, seed


@pytest.mark.parametrize("flags, message", [
    (["--tfr_d_step", "1.5"], "--tfr_d_step must lie in [0, 1], got 1.5"),
    (["--tfr_d_step", "-0.1"], "--tfr_d_step must lie in [0, 1], got -0.1"),  # a ratio rising above --tfr
    (["--tfr_sde", "-1"], "--tfr_sde"),
    (["--fast_train", "--fast_partial", "0"], "--fast_partial must lie in (0, 1], got 0.0"),
    (["--fast_train", "--fast_partial", "1.5"], "--fast_partial must lie in (0, 1], got 1.5"),
    (["--fast_train", "--fast_train_epoch", "0"], "--fast_train_epoch must be positive, got 0"),
    (["--kl_anneal_cycle", "0"], "--kl_anneal_cycle must be positive, got 0"),  # a division by 0 in the schedule
    (["--scheduler", "step", "--step_size", "0"], "--step_size must be positive, got 0"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0"),
])
def test_schedule_flags_out_of_range_are_refused(flags, message):
    from modules.options import ConfigError, check_trainer, trainer_parser
    args = trainer_parser().parse_args(["--device", "cpu", *flags])
    with pytest.raises(ConfigError) as e:
        check_trainer(args)
    assert message in str(e.value)
