"""The one training loop: budgets, early stopping, the non-finite guard, determinism."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import vmonf.training
from vmonf.packing import pack_parameters
from vmonf.training import NonFiniteLossError, TrainConfig, _cosine_factor, evaluate, train


def quadratic_problem():
    target = torch.tensor([3.0, -2.0])
    module = nn.Linear(2, 1)
    x = torch.randn(256, 2)
    y = x @ target[:, None] + 0.1 * torch.randn(256, 1)

    def objective(batch, step):
        xb, yb = batch
        return ((module(xb) - yb) ** 2).mean()

    return module, objective, (x, y)


def test_training_reduces_the_loss_and_records_history():
    module, objective, data = quadratic_problem()
    result = train(
        module,
        objective,
        data,
        TrainConfig(max_epochs=30, batch_size=32, learning_rate=0.05),
        generator=torch.Generator().manual_seed(0),
    )
    assert result.n_epochs == 30 and result.n_steps == 30 * 8
    assert result.history["loss"][-1] < 0.05 < result.history["loss"][0]
    assert len(result.history["lr"]) == len(result.history["time"]) == 30
    assert result.history["lr"][-1] < result.history["lr"][0]  # cosine schedule


def test_same_generator_same_weights():
    weights = []
    for _ in range(2):
        torch.manual_seed(1)
        module, objective, data = quadratic_problem()
        train(
            module,
            objective,
            data,
            TrainConfig(max_epochs=3, batch_size=16),
            generator=torch.Generator().manual_seed(7),
        )
        weights.append(module.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_time_budget_stops_training():
    module, objective, data = quadratic_problem()
    result = train(
        module,
        objective,
        data,
        TrainConfig(max_epochs=10**6, max_time=0.2),
        generator=torch.Generator().manual_seed(0),
    )
    assert result.stop_reason == "max_time"
    assert result.history["time"][-1] < 5.0


def test_early_stopping_restores_the_best_epoch():
    module, objective, data = quadratic_problem()
    calls = []

    def validation_objective(batch, step):
        calls.append(step)
        # Best at the second evaluation, worse afterwards.
        return torch.tensor(float(abs(len(calls) - 2)))

    snapshots = []
    result = train(
        module,
        objective,
        data,
        TrainConfig(max_epochs=50, patience=3),
        generator=torch.Generator().manual_seed(0),
        validation=data,
        validation_objective=validation_objective,
        on_epoch_end=lambda e, s, h: snapshots.append(module.weight.detach().clone()),
    )
    assert result.stop_reason == "early_stopping"
    assert result.n_epochs == 5
    assert result.best_validation == 0.0
    torch.testing.assert_close(module.weight.detach(), snapshots[1])
    with pytest.raises(ValueError, match=r"patience .* needs validation data"):
        train(module, objective, data, TrainConfig(max_epochs=5, patience=3), generator=None)


def test_a_nan_loss_is_skipped_and_never_reaches_the_weights():
    module, objective, data = quadratic_problem()
    seen = []

    def faulty(batch, step):
        loss = objective(batch, step)
        if step == 5:  # fault hook: one NaN
            return loss * math.nan
        seen.append(step)
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        result = train(
            module,
            faulty,
            data,
            TrainConfig(max_epochs=4, batch_size=32),
            generator=torch.Generator().manual_seed(0),
        )
    assert result.n_bad_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert result.history["loss"][-1] < result.history["loss"][0]


def test_an_update_that_breaks_the_model_is_never_kept_even_the_last_one():
    """A finite step can still send the weights where the loss is inf. The next step's
    check catches it, so an epoch's weights count as good only once a loss proves them
    finite, and the last update is checked on its batch before train returns."""
    weight = nn.Parameter(torch.zeros(1, dtype=torch.float32))
    module = nn.Module()
    module.weight = weight

    def objective(batch, step):  # Adam moves w by ~lr: (1e30 - 1)^2 overflows float32
        return ((weight - 1.0) ** 2).sum() + 0.0 * batch[0].sum()

    data = (torch.zeros(4, 1, dtype=torch.float32),)
    for epochs in (1, 3):
        weight.data.zero_()
        with (
            pytest.warns(RuntimeWarning, match="non-finite"),
            pytest.raises(NonFiniteLossError, match=r"no update survived.*started from"),
        ):
            train(
                module,
                objective,
                data,
                TrainConfig(max_epochs=epochs, batch_size=4, learning_rate=1e30),
                generator=torch.Generator().manual_seed(0),
            )
        assert weight.item() == 0.0  # the only weights that ever gave a finite loss


@pytest.mark.parametrize("n_batches", [1, 2, 3])
def test_a_stage_that_kept_no_update_is_an_error_however_its_epochs_are_cut(n_batches):
    """With several batches an epoch could end on a restore, and the next finite loss
    (of the restored start weights) once counted as progress."""
    weight = nn.Parameter(torch.zeros(1, dtype=torch.float32))
    module = nn.Module()
    module.weight = weight
    data = (torch.zeros(4 * n_batches, 1),)
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(NonFiniteLossError, match="no update survived"),
    ):
        train(module, lambda b, _: ((weight - 1.0) ** 2).sum() + 0.0 * b[0].sum(), data,
              TrainConfig(max_epochs=4, batch_size=4, learning_rate=1e30),
              generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert weight.item() == 0.0


def test_one_bad_step_in_a_one_epoch_stage_is_a_warning_not_an_error():
    """A stage that kept updates before its only bad step returns them (it raised once)."""
    weight = nn.Parameter(torch.full((1,), 0.9))
    module = nn.Module()
    module.weight = weight

    def objective(batch, step):  # step 2 of 4 is non-finite
        return ((weight - 1.0) ** 2).sum() * (math.nan if step == 2 else 1.0)

    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = train(module, objective, (torch.zeros(16, 1),),
                       TrainConfig(max_epochs=1, batch_size=4, learning_rate=1e-3),
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert result.n_bad_steps == 1 and math.isfinite(weight.item())


def test_a_stage_whose_later_updates_are_undone_keeps_its_progress_without_error():
    """Only a stage that kept no update at all is an error: one whose first epoch
    trained and whose later updates were undone returns the first epoch's weights."""
    weight = nn.Parameter(torch.zeros(1, dtype=torch.float32))
    module = nn.Module()
    module.weight = weight

    def objective(batch, step):  # finite until step 2 (the third update's check)
        return ((weight - 1.0) ** 2).sum() * (math.inf if step >= 2 else 1.0)

    data = (torch.zeros(4, 1, dtype=torch.float32),)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = train(module, objective, data,
                       TrainConfig(max_epochs=4, batch_size=4, learning_rate=0.1),
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert result.n_bad_steps >= 1 and 0.0 < weight.item() < 1.0


def test_a_nan_gradient_of_a_finite_loss_is_caught():
    module, objective, data = quadratic_problem()
    seen = []

    def nan_gradient_only(batch, step):
        seen.append(module.weight.detach().clone())
        loss = objective(batch, step)
        if step == 2:  # the branch not taken: the loss stays finite, its gradient is NaN
            hidden = torch.sqrt(-module.weight.sum().abs() - 1.0)
            loss = loss + torch.where(torch.tensor(True), torch.tensor(0.0), hidden)
            assert torch.isfinite(loss)
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient at step 2"):
        result = train(
            module, nan_gradient_only, data, TrainConfig(max_epochs=1, batch_size=64),
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert result.n_bad_steps == 1
    torch.testing.assert_close(seen[3], seen[0])  # step 2 not applied: back to the start
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_non_finite_step_rolls_back_to_the_last_good_epoch_not_to_the_start():
    module, objective, data = quadratic_problem()  # 4 steps per epoch at batch 64
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    ends = []

    def faulty(batch, step):
        loss = objective(batch, step)
        return loss * math.nan if step == 8 else loss  # the first step of epoch 2

    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError):
        train(
            module, faulty, data, TrainConfig(max_epochs=5, batch_size=64, max_bad_steps=0),
            generator=torch.Generator().manual_seed(0),
            on_epoch_end=lambda e, s, h: ends.append(
                {k: v.clone() for k, v in module.state_dict().items()}
            ),
        )  # fmt: skip
    # Epoch 1's weights were never proven finite by a loss (its successor's first one is
    # NaN), so the last good state is where epoch 0 ended, not where training started.
    assert len(ends) == 2
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, ends[0][key])
        assert not torch.equal(value, initial[key])


def test_gradients_are_clipped_to_grad_clip():
    module, objective, data = scalar_problem(target=1e6)  # a gradient of 2e6

    config = TrainConfig(max_epochs=1, batch_size=8, grad_clip=1.0, lr_schedule="constant")
    train(module, objective, data, config, generator=torch.Generator())
    assert module.w.grad is not None
    assert float(module.w.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_evaluate_weights_each_chunk_by_its_size():
    data = (torch.arange(10.0, dtype=torch.float64)[:, None],)
    assert evaluate(lambda batch, _: batch[0].mean(), data, 0, chunk_size=3) == 4.5


def test_repeated_failures_stop_with_a_clear_error_and_finite_weights():
    module, objective, data = quadratic_problem()
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError, match="non-finite"):
        train(
            module,
            lambda b, s: objective(b, s) * math.nan,
            data,
            TrainConfig(max_epochs=3, batch_size=16, max_bad_steps=4),
            generator=torch.Generator(),
        )
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_non_finite_weights_on_entry_are_never_returned_as_trained():
    module, objective, data = quadratic_problem()
    with torch.no_grad():
        module.weight.fill_(math.nan)  # e.g. corrupted between two stages
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError, match="started"):
        train(module, objective, data, TrainConfig(max_epochs=1, batch_size=64),
              generator=torch.Generator())  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_epochs", 0, "max_epochs"),
        ("batch_size", -1, "batch_size"),
        ("learning_rate", 0.0, "learning_rate"),
        ("max_time", -5.0, "max_time"),
        ("lr_schedule", "step", "lr_schedule"),
        ("patience", 0, "patience"),
        ("lr_schedule_epochs", 0, "lr_schedule_epochs"),
        ("lr_schedule_start", -1, "lr_schedule_start"),
    ],
)
def test_bad_config_is_rejected(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


# --------------------------------------------------------------------------- packing


def test_packed_parameters_are_views_of_one_buffer_with_gradients_in_place():
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    before = [p.detach().clone() for p in module.parameters()]
    packed = pack_parameters(list(module.parameters()))
    assert packed is not None and packed.numel() == sum(p.numel() for p in before)
    for p, old in zip(module.parameters(), before, strict=True):
        torch.testing.assert_close(p, old, rtol=0, atol=0)
    module[0].bias.data[0] = 5.0  # the buffer aliases every parameter
    assert 5.0 in packed.detach()
    module(torch.randn(6, 3, dtype=torch.float64)).square().sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
    torch.testing.assert_close(packed.grad, grads, rtol=0, atol=0)
    assert packed.grad.abs().sum() > 0


def test_packing_refuses_what_it_cannot_pack():
    assert pack_parameters([]) is None
    mixed = [nn.Parameter(torch.zeros(2, dtype=torch.float32)), nn.Parameter(torch.zeros(2))]
    assert pack_parameters(mixed) is None and mixed[0].grad is None  # left as it was
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="distinct"):
        pack_parameters([p, p])


def test_training_on_packed_parameters_equals_training_on_separate_ones(monkeypatch):
    trained = []
    for pack in (True, False):
        if not pack:
            monkeypatch.setattr(vmonf.training, "pack_parameters", lambda params: None)
        torch.manual_seed(3)
        module = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        x = torch.randn(96, 2, dtype=torch.float64)
        y = x.sin().sum(1, keepdim=True)
        config = TrainConfig(max_epochs=4, batch_size=16, learning_rate=0.05, weight_decay=1e-3)
        train(module, lambda b, _, m=module: (m(b[0]) - b[1]).square().mean(), (x, y), config,
              generator=torch.Generator().manual_seed(0))  # fmt: skip
        trained.append([p.detach().clone() for p in module.parameters()])
    for packed, separate in zip(*trained, strict=True):
        torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-12)


def test_a_parameter_listed_twice_is_trained_once():
    module, objective, data = quadratic_problem()
    params = [module.weight, module.bias, module.weight]
    result = train(module, objective, data, TrainConfig(max_epochs=2, batch_size=32),
                   generator=torch.Generator().manual_seed(0), parameters=params)  # fmt: skip
    assert result.n_steps == 16 and torch.isfinite(module.weight).all()


def test_progress_bars_show_in_a_terminal_or_notebook_never_in_a_log(monkeypatch, capsys):
    module, objective, data = quadratic_problem()
    config = TrainConfig(max_epochs=2, batch_size=64, verbose=True, desc="fitting")
    train(module, objective, data, config, generator=torch.Generator().manual_seed(0))
    assert "fitting" not in capsys.readouterr().err  # pytest's stderr: not a terminal
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    train(module, objective, data, config, generator=torch.Generator().manual_seed(0))
    assert "fitting" in capsys.readouterr().err


def scalar_problem(target: float = 10.0):
    """(w - target)^2 for one scalar w starting at 0; 8 points, so one step per epoch
    at batch_size=8."""
    module = nn.Module()
    module.w = nn.Parameter(torch.zeros(1))
    data = (torch.zeros(8, 1),)

    def objective(batch, step):
        return ((module.w - target) ** 2).sum() + 0.0 * batch[0].sum()

    return module, objective, data


def test_cosine_schedule_runs_from_the_rate_down_to_the_floor():
    assert _cosine_factor(0, 10, 0.05) == pytest.approx(1.0)
    assert _cosine_factor(5, 10, 0.05) == pytest.approx(0.525)
    assert _cosine_factor(10, 10, 0.05) == pytest.approx(0.05)
    assert _cosine_factor(99, 10, 0.05) == pytest.approx(0.05)


def test_cosine_schedule_starts_afresh_at_start_step():
    module, objective, data = scalar_problem()
    config = TrainConfig(max_epochs=4, batch_size=8, learning_rate=0.1, lr_floor=0.05)
    result = train(module, objective, data, config, generator=torch.Generator(), start_step=1000)
    expected = [0.1 * _cosine_factor(step, 4, 0.05) for step in range(4)]
    assert result.history["lr"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_calls_continued_with_the_optimizer_state_equal_one_long_call(schedule):
    """Two calls of 2 epochs, the second continuing Adam's state and the first's learning
    rate schedule, give the weights of one call of 4 epochs (competitive rounds)."""
    weights = []
    for split in (False, True):
        torch.manual_seed(1)
        module, objective, data = quadratic_problem()
        generator = torch.Generator().manual_seed(7)
        config = dict(batch_size=32, learning_rate=0.05, weight_decay=1e-3, lr_schedule=schedule)
        if split:
            first = train(module, objective, data, TrainConfig(max_epochs=2,
                          lr_schedule_epochs=4, **config), generator=generator,
                          return_optimizer_state=True)  # fmt: skip
            kept = {k: v.clone() for k, v in first.optimizer_state["state"][0].items()}
            second = TrainConfig(max_epochs=2, lr_schedule_epochs=4, lr_schedule_start=2, **config)
            result = train(module, objective, data, second, generator=generator,
                           optimizer_state=first.optimizer_state)  # fmt: skip
            lrs = first.history["lr"] + result.history["lr"]
            for key, value in kept.items():  # a copy: the second call left it alone
                torch.testing.assert_close(first.optimizer_state["state"][0][key], value)
        else:
            result = train(module, objective, data, TrainConfig(max_epochs=4, **config),
                           generator=generator)  # fmt: skip
            lrs = result.history["lr"]
        weights.append((module.weight.detach().clone(), module.bias.detach().clone(), lrs))
    torch.testing.assert_close(weights[1][:2], weights[0][:2], rtol=1e-6, atol=1e-7)
    assert weights[1][2] == pytest.approx(weights[0][2], rel=1e-12)


def test_an_optimizer_state_of_other_parameters_is_refused():
    module, objective, data = quadratic_problem()
    config = TrainConfig(max_epochs=1, batch_size=64)
    other = nn.Linear(3, 1)
    state = train(
        other, lambda batch, _: other(batch[0]).square().mean(), (torch.randn(8, 3),), config,
        generator=torch.Generator(), return_optimizer_state=True,
    ).optimizer_state  # fmt: skip
    with pytest.raises(ValueError, match="optimizer_state is not of these parameters"):
        train(module, objective, data, config, generator=torch.Generator(), optimizer_state=state)


def test_a_non_finite_step_halves_the_rate_and_restarts_adam():
    module, objective, data = scalar_problem()
    trace = []

    def faulty(batch, step):
        trace.append(float(module.w.detach()))
        loss = objective(batch, step) * (100.0 if step == 0 else 1.0)  # a big first gradient
        return loss * math.nan if step == 1 else loss

    config = TrainConfig(
        max_epochs=3, batch_size=8, learning_rate=0.1, lr_schedule="constant", grad_clip=None
    )
    with pytest.warns(RuntimeWarning, match="halved"):
        result = train(module, faulty, data, config, generator=torch.Generator())
    assert result.n_bad_steps == 1
    assert result.history["lr"] == pytest.approx([0.1, 0.1, 0.05])
    assert trace[:3] == pytest.approx([0.0, 0.1, 0.0])  # NaN at step 1: back to the start
    # A fresh Adam's first step moves w by the (halved) rate, whatever the old moments.
    assert float(module.w.detach()) == pytest.approx(0.05, rel=1e-6)


def test_max_bad_steps_non_finite_steps_are_tolerated_then_it_stops():
    module, objective, data = scalar_problem()
    config = TrainConfig(max_epochs=20, batch_size=8, max_bad_steps=4)
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError) as info:
        train(module, lambda b, s: objective(b, s) * math.nan, data, config,
              generator=torch.Generator())  # fmt: skip
    assert info.value.result.n_bad_steps == 5


def validated_run(values, nan_from=None, patience=2, max_bad_steps=10):
    """One step per epoch; epoch e's validation loss is values[e] (then the last value);
    losses are NaN from step ``nan_from`` on. Returns the module, the result (None if
    training gave up) and the weights at the end of each epoch."""
    module, objective, data = scalar_problem()
    n_validations, snapshots = [0], []

    def validation_objective(batch, step):
        n_validations[0] += 1
        return torch.tensor(values[min(n_validations[0], len(values)) - 1])

    def loss(batch, step):
        value = objective(batch, step)
        return value * math.nan if nan_from is not None and step >= nan_from else value

    config = TrainConfig(
        max_epochs=30, batch_size=8, learning_rate=0.1, patience=patience,
        max_bad_steps=max_bad_steps,
    )  # fmt: skip
    try:
        result = train(
            module, loss, data, config, generator=torch.Generator(), validation=data,
            validation_objective=validation_objective,
            on_epoch_end=lambda e, s, h: snapshots.append(module.w.detach().clone()),
        )  # fmt: skip
    except NonFiniteLossError:
        result = None
    return module, result, snapshots


def test_early_stopping_needs_a_strictly_better_validation_loss():
    module, result, snapshots = validated_run([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert result.stop_reason == "early_stopping" and result.n_epochs == 4
    torch.testing.assert_close(module.w.detach(), snapshots[1])  # the first of the tied epochs


def test_giving_up_on_non_finite_losses_keeps_the_best_validated_weights():
    # Best validation at epoch 1, worse at epochs 2 and 3, NaN from step 4 on.
    with pytest.warns(RuntimeWarning):
        module, result, snapshots = validated_run(
            [1.0, 0.0, 2.0, 3.0], nan_from=4, patience=100, max_bad_steps=2
        )
    assert result is None
    torch.testing.assert_close(module.w.detach(), snapshots[1])


def test_config_turns_numpy_scalars_into_python_numbers():
    # A parameter grid built with np.arange hands out numpy scalars; torch refuses them
    # as split sizes.
    config = TrainConfig(
        max_epochs=np.int64(2), batch_size=np.int32(8), learning_rate=np.float32(0.5)
    )
    assert (type(config.max_epochs), type(config.batch_size)) == (int, int)
    assert type(config.learning_rate) is float and config.learning_rate == 0.5
    with pytest.raises(ValueError, match=r"batch_size must be <= 2147483647"):
        TrainConfig(batch_size=2**63)
